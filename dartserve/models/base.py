"""What every model family shares: the language model's parts and the per-request encoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from dartserve.pruning.base import Grid, ImageSpan


@dataclass
class EncodedPrompt:
    """One request ready for the language model, as the vision stage hands it to the pruner.

    ``image_features`` are the projected vision tokens of all images in order of appearance;
    ``positions`` ``[P, seq]`` are rotary positions (P = 1, or 3 for M-RoPE).
    """

    input_ids: torch.Tensor
    image_features: torch.Tensor
    spans: list[ImageSpan]
    positions: torch.Tensor

    @property
    def num_vision_tokens(self) -> int:
        return sum(span.length for span in self.spans)


class ModelAdapter:
    """A multimodal checkpoint seen through transformers' public module structure.

    Subclasses say how a family turns images into projected tokens and where they go; the
    decoder layers, rotary embedding, final norm and LM head are used as they are.
    """

    model_types: tuple[str, ...] = ()
    position_dims = 1

    def __init__(self, model, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.text = model.model.language_model
        self.layers = self.text.layers
        self.lm_head = model.lm_head
        self.image_token_id = model.config.image_token_id
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_positions(self) -> int:
        return self.text.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def prompt_text(self, prompt: str, num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], prompt: str) -> EncodedPrompt:
        """Runs the processor and the vision tower for one request."""
        inputs = self.processor(
            text=[self.prompt_text(prompt, len(images))], images=images or None, return_tensors="pt"
        ).to(self.device)
        input_ids = inputs["input_ids"][0]
        features = self.image_features(inputs) if images else []
        grids = [self.grids(inputs, i, f) for i, f in enumerate(features)]
        spans = image_spans(input_ids, self.image_token_id, grids, [len(f) for f in features])
        hidden = self.text.config.hidden_size
        stacked = torch.cat(features).to(self.dtype) if features else torch.empty(0, hidden, dtype=self.dtype)
        return EncodedPrompt(input_ids, stacked, spans, self.positions(inputs))

    def embed(self, request: EncodedPrompt) -> torch.Tensor:
        embeds = self.text.embed_tokens(request.input_ids.to(self.device))
        embeds[request.input_ids.to(self.device) == self.image_token_id] = request.image_features.to(embeds)
        return embeds

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` ``[P, batch, seq]``."""
        return self.text.rotary_emb(hidden, positions[0] if positions.shape[0] == 1 else positions)

    def image_features(self, inputs) -> list[torch.Tensor]:
        """Projected vision tokens ``[n_i, hidden]`` per image, as the language model reads them."""
        raise NotImplementedError

    def grids(self, inputs, image_index: int, features: torch.Tensor) -> tuple[Grid, ...]:
        """Where an image's tokens sit in 2-D, for the spatial pruning methods."""
        raise NotImplementedError

    def positions(self, inputs) -> torch.Tensor:
        seq = inputs["input_ids"].shape[1]
        return torch.arange(seq, device=self.device)[None]


def image_spans(input_ids: torch.Tensor, image_token_id: int, grids: list[tuple[Grid, ...]], lengths: list[int]) -> list[ImageSpan]:
    """One span per image, read from the token ids: the image placeholders in order, cut by each
    image's token count (two images may be adjacent, with no text between them)."""
    where = (input_ids == image_token_id).nonzero().flatten().tolist()
    if len(where) != sum(lengths):
        raise ValueError(f"the prompt has {len(where)} image placeholders but the images give {sum(lengths)} tokens")
    spans, cursor = [], 0
    for length, image_grids in zip(lengths, grids):
        start = where[cursor]
        if where[cursor + length - 1] != start + length - 1:
            raise ValueError("an image's placeholder tokens are not contiguous")
        spans.append(ImageSpan(start, length, image_grids))
        cursor += length
    return spans
