"""Qwen2-VL and Qwen2.5-VL: merged patch grids and 3-D M-RoPE positions (temporal, height, width)."""

from __future__ import annotations

import torch

from dartserve.models.base import ModelAdapter
from dartserve.pruning.base import Grid


class Qwen2VLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_dims = 3
    vision_modules = ("visual",)

    def image_features(self, inputs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
        return list(out.pooler_output)

    def image_inputs(self, inputs, index: int) -> dict:
        grid = inputs["image_grid_thw"]
        patches = grid.prod(dim=1).tolist()  # pixel_values holds every image's patches, one after another
        start = sum(patches[:index])
        return {"pixel_values": inputs["pixel_values"][start : start + patches[index]], "image_grid_thw": grid[index : index + 1]}

    def image_features_many(self, images: list[dict]) -> list[torch.Tensor]:
        return self.image_features({"pixel_values": torch.cat([i["pixel_values"] for i in images]), "image_grid_thw": torch.cat([i["image_grid_thw"] for i in images])})

    def grids(self, inputs, image_index: int, features: torch.Tensor) -> tuple[Grid, ...]:
        merge = self.model.config.vision_config.spatial_merge_size
        t, h, w = inputs["image_grid_thw"][image_index].tolist()
        h, w = h // merge, w // merge
        return tuple(Grid(frame * h * w, h, w, w) for frame in range(t))

    def positions(self, inputs) -> torch.Tensor:
        # mm_token_type_ids always goes in: without it transformers cannot place the image tokens on the 3-D grid.
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
        )
        return positions[:, 0]
