"""What every model family shares: the language model's parts and the per-request encoding."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.utils.chat_template_utils import mark_control_tokens

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
    vision_modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector")  # of ``model.model``

    def __init__(self, model, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.text = model.model.language_model
        self.layers = self.text.layers
        self.lm_head = model.lm_head
        self.image_token_id = model.config.image_token_id
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
        self.parts = PARTS

    def keep_only(self, parts: tuple[str, ...]) -> None:
        """Drops the weights a process does not run: a vision service needs no language model,
        a pruner or generator no vision tower. The fingerprint, taken first, still names the
        whole checkpoint, so the services of one deployment agree on it."""
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"parts are some of {', '.join(PARTS)}, got {parts!r}")
        self.fingerprint  # noqa: B018 - computed over every weight before any goes
        if "language" not in parts:
            self.text.layers = self.layers = torch.nn.ModuleList()
            self.text.embed_tokens = self.text.norm = self.model.lm_head = self.lm_head = None
        if "vision" not in parts:
            for name in self.vision_modules:
                setattr(self.model.model, name, None)
        self.parts = tuple(p for p in PARTS if p in parts)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Names the model: its config, its processor (image settings, chat template, vocabulary
        size), and each tensor's name, shape, dtype and about 300 of its values, evenly spread.
        Services that load the same checkpoint agree on it whatever their device, and a cache
        written by another model never matches."""
        # Where the checkpoint was loaded from does not name it: the same files anywhere agree.
        config = json.loads(self.model.config.to_json_string(use_diff=False), object_hook=lambda d: {k: v for k, v in d.items() if k != "_name_or_path"})
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        digest.update(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
        digest.update(str(len(self.processor.tokenizer)).encode())
        for name, tensor in self.model.state_dict().items():
            flat = tensor.detach().flatten()
            sample = torch.cat([flat[:16], flat[:: max(1, len(flat) // 256)], flat[-16:]]).float().cpu()
            digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}:".encode() + sample.numpy().tobytes())
        return digest.hexdigest()[:32]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_positions(self) -> int:
        return self.text.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def prompt_text(self, prompt: str | list[dict], num_images: int) -> str:
        """The chat template applied to a question, or to a conversation (``chat_messages``) whose
        first user turn carries the images; it ends where the assistant's answer begins. What the
        turns say is marked as text (``_user_text``), so that tokenizing with
        ``sanitize_control_tokens`` makes no control token of it."""
        messages = chat_messages(prompt)
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        rendered = [
            {
                "role": m["role"],
                "content": [{"type": "image"}] * (num_images if i == first_user else 0) + [{"type": "text", "text": self._user_text(m["content"])}],
            }
            for i, m in enumerate(messages)
        ]
        return self.processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)

    def _user_text(self, text: str) -> str:
        """``text`` with every added token in it (``</s>``, ``<image>``, ``<|im_end|>``, ...)
        marked, so that a tokenizer called with ``sanitize_control_tokens`` encodes it as the
        plain characters it is: a turn's text never ends the turn, opens another, or stands for
        an image. Markers already in ``text`` are dropped first, so none can be forged."""
        return mark_control_tokens(text, self._added_tokens)

    @functools.cached_property
    def _added_tokens(self) -> re.Pattern:
        tokens = sorted(self.processor.tokenizer.added_tokens_encoder, key=len, reverse=True)  # longest first
        return re.compile("|".join(map(re.escape, tokens)) or "(?!)")

    @functools.cached_property
    def _leading_special_text(self) -> str:
        """What the tokenizer puts before a text of its own accord (LLaVA's ``<s>``, nothing for
        Qwen), as text: a marked prompt is tokenized without special tokens added, so the
        rendered prompt carries them itself."""
        tokenizer = self.processor.tokenizer
        return tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])

    def turn_ids(self, pending: int, question: str) -> list[int]:
        """The tokens that carry a conversation from an answer whose last token ``pending`` is
        picked but not yet in the cache to the start of the answer to ``question``; the question
        is tokenized as text, as it is in a whole conversation's prompt."""
        answered = self.prompt_text("x", 0)
        closed = self._render([("user", "x"), ("assistant", "y")])
        opened = self.prompt_text([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": question}], 0)
        if not (closed.startswith(answered) and opened.startswith(closed) and closed.rfind("y") >= len(answered)):
            raise ValueError("this model's chat template cannot continue a conversation from its cache")
        after_answer = closed[closed.rfind("y") + 1 :]  # the end-of-turn text, "</s>" or "<|im_end|>\n"
        if pending in self.eos_token_ids:  # the answer's own end-of-sequence token closes the turn
            after_answer = after_answer.removeprefix(self.processor.tokenizer.decode([pending]))
        rest = self.processor.tokenizer(after_answer + opened[len(closed) :], add_special_tokens=False, sanitize_control_tokens=True)
        return [pending] + rest["input_ids"]

    def _render(self, turns: list[tuple[str, str]]) -> str:
        messages = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in turns]
        return self.processor.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def encode(
        self,
        images: list[Image.Image],
        prompt: str | list[dict],
        known: list[torch.Tensor | None] | None = None,
        tower: Callable[[list[dict]], list[torch.Tensor]] | None = None,
    ) -> EncodedPrompt:
        """Runs the processor and the vision tower for one request. ``known[i]``, when given, are
        image i's projected tokens from an earlier encoding, and its tower pass is skipped. ``tower``
        runs the tower on the other images' inputs (``image_inputs``); by default in one forward
        (``image_features_many``), or, given, where the caller batches them with other requests'."""
        text = self._leading_special_text + self.prompt_text(prompt, len(images))
        inputs = self.processor(
            text=[text], images=images or None, return_tensors="pt", add_special_tokens=False, sanitize_control_tokens=True
        ).to(self.device)
        input_ids = inputs["input_ids"][0]
        known = known or [None] * len(images)
        new = [i for i, f in enumerate(known) if f is None]
        encoded = iter((tower or self.image_features_many)([self.image_inputs(inputs, i) for i in new]) if new else ())
        features = [f.to(self.device, self.dtype) if f is not None else next(encoded) for f in known]
        grids = [self.grids(inputs, i, f) for i, f in enumerate(features)]
        spans = image_spans(input_ids, self.image_token_id, grids, [len(f) for f in features])
        hidden = self.text.config.hidden_size
        stacked = torch.cat(features).to(self.dtype) if features else torch.empty(0, hidden, dtype=self.dtype)
        return EncodedPrompt(input_ids, stacked, spans, self.positions(inputs))

    def image_inputs(self, inputs, index: int) -> dict:
        """The processor's tensors for image ``index`` alone."""
        return {"pixel_values": inputs["pixel_values"][index : index + 1]}

    @torch.inference_mode()
    def image_features_many(self, images: list[dict]) -> list[torch.Tensor]:
        """``image_features`` of several images' ``image_inputs``, in one tower forward: the tower
        attends within an image only, so an image's tokens do not depend on the others'."""
        return self.image_features({"pixel_values": torch.cat([i["pixel_values"] for i in images])})

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


PARTS = ("vision", "language")  # the vision tower and projector; the language model and its head


def chat_messages(prompt) -> list[dict]:
    """A question as one user turn, or a checked conversation: ``{"role", "content"}`` turns,
    text only, an optional system turn first, then user and assistant alternating, starting and
    ending with the user."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("a prompt is a string or a non-empty list of chat messages")
    system = isinstance(prompt[0], dict) and prompt[0].get("role") == "system"
    for i, message in enumerate(prompt):
        role = "system" if system and i == 0 else "user" if (i - system) % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != role or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': '{role}', 'content': str}}: an optional system turn, then turns alternate, starting with the user")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"message {i} is not valid Unicode text (a lone surrogate?)") from None
    if (len(prompt) - system) % 2 == 0:
        raise ValueError("a conversation must end with the user's turn")
    return prompt


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
