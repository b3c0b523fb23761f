"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of tokens per image."""

from __future__ import annotations

import torch

from dartserve.models.base import ModelAdapter
from dartserve.pruning.base import Grid
from dartserve.pruning.spatial import square_grid


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)

    def image_features(self, inputs) -> list[torch.Tensor]:
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def grids(self, inputs, image_index: int, features: torch.Tensor) -> tuple[Grid, ...]:
        return square_grid(len(features))
