"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a base tile, then the any-resolution tiles
unpadded to the image's aspect ratio with an image-newline token closing every row."""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image

from dartserve.models.base import ModelAdapter
from dartserve.pruning.base import Grid


class LlavaNextAdapter(ModelAdapter):
    model_types = ("llava_next",)

    def image_features(self, inputs) -> list[torch.Tensor]:
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def image_inputs(self, inputs, index: int) -> dict:
        return {"pixel_values": inputs["pixel_values"][index : index + 1], "image_sizes": inputs["image_sizes"][index : index + 1]}

    def image_features_many(self, images: list[dict]) -> list[torch.Tensor]:
        config = self.model.config
        # Each image's tiles, unpadded: requests pad their images to different tile counts.
        tiles = [
            i["pixel_values"][0, : image_size_to_num_patches(i["image_sizes"][0], config.image_grid_pinpoints, config.vision_config.image_size)]
            for i in images
        ]
        return self.image_features({"pixel_values": torch.cat(tiles), "image_sizes": torch.cat([i["image_sizes"] for i in images])})

    def grids(self, inputs, image_index: int, features: torch.Tensor) -> tuple[Grid, ...]:
        config = self.model.config
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        base = Grid(0, side, side, side)
        if len(features) == side * side + 1:  # a single tile: base grid and one newline
            return (base,)
        image_size = inputs["image_sizes"][image_index].tolist()
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tile)
        h, w = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), image_size).shape[1:]
        if side * side + h * (w + 1) != len(features):
            raise ValueError(f"cannot lay out {len(features)} LLaVA-NeXT tokens as a {side}x{side} base and {h}x{w} tiles")
        return (base, Grid(side * side, h, w, w + 1))
