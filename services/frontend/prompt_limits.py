"""Refusing a question that cannot fit the model's positions before any stage works on it, from
what is cheap to know first: the images' token counts from their sizes (read from the file
headers, nothing decoded), then a lower bound on the text's tokens from its characters, then,
only where that bound leaves room, the text's tokens. A question that cannot fit costs the
gateway a moment and the stages nothing, however large it is.

The gateway and the workers load the model's processor and configuration for this, never its
weights.
"""

from __future__ import annotations

import copy
import functools
import io
import math

from PIL import Image

from dartserve.checks import SettingError


class PromptLimits:
    def __init__(self, processor, max_positions: int) -> None:
        self.processor, self.max_positions = processor, max_positions
        # A fast tokenizer keeps split_special_tokens as state of its shared backend: counting
        # with it set on the engine's own tokenizer would, in another thread, tokenize a prompt's
        # <image> as text. The limits count with a copy.
        self.tokenizer = copy.deepcopy(processor.tokenizer)
        # No token stands for more characters than its own string has: byte-level BPE spells
        # each byte as one character, SentencePiece each character as itself.
        self.max_token_chars = max(len(token) for token in self.tokenizer.get_vocab())
        self._tokens_at = functools.lru_cache(maxsize=4096)(self._count)

    @classmethod
    def for_model(cls, model: str) -> PromptLimits:
        from transformers import AutoConfig

        from dartserve.models.loading import load_processor

        config = AutoConfig.from_pretrained(model)
        return cls(load_processor(model, config.model_type), config.get_text_config().max_position_embeddings)

    @classmethod
    def of_adapter(cls, adapter) -> PromptLimits:
        return cls(adapter.processor, adapter.max_positions)

    def check(self, images: list[bytes], texts: list[str], max_new_tokens: int, context_tokens: int = 0) -> None:
        """``texts``: what is tokenized afresh for this turn; ``context_tokens``: the positions
        a conversation's earlier turns already take."""
        room = self.max_positions - context_tokens
        image_tokens = self.image_tokens(images)
        if image_tokens > room:
            raise SettingError(f"the images take {image_tokens} positions; the model has {room} left", "images")
        text_tokens = math.ceil(sum(len(text) for text in texts) / self.max_token_chars)
        if image_tokens + text_tokens <= room:  # not refused by the cheap bound: count them
            text_tokens = sum(len(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) for text in texts)
        if image_tokens + text_tokens > room:
            raise SettingError(f"the question takes at least {text_tokens} positions and its images {image_tokens}; the model has {room} left", "question")
        if image_tokens + text_tokens + max_new_tokens > room:
            raise SettingError(
                f"the prompt takes at least {image_tokens + text_tokens} positions and max_new_tokens={max_new_tokens} more, past the {room} the model has left",
                "max_new_tokens",
            )

    def image_tokens(self, images: list[bytes]) -> int:
        """The image tokens the model will see, from each image's size; one that does not open
        counts none here (the vision stage refuses it with its reason)."""
        total = 0
        for data in images:
            try:
                with Image.open(io.BytesIO(data)) as image:  # reads the header only
                    size = (image.height, image.width)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue
            total += self._tokens_at(size)
        return total

    def _count(self, size: tuple[int, int]) -> int:
        """The tokens of an image of ``size``; 0 from a processor that cannot say (no bound from
        images). Asking the processor costs far more than the rest of the check, so the counts
        are cached by size (``_tokens_at``)."""
        try:
            return self.processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]
        except (AttributeError, NotImplementedError):
            return 0
