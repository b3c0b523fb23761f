"""Tiny, randomly initialised Hugging Face checkpoints for tests.

``build_tiny_checkpoint(family, path)`` writes a *complete* checkpoint directory (safetensors weights,
config, generation config, tokenizer, image processor and processor with a chat template) for one of
the supported multimodal families, so that the ordinary loading path::

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

works on it exactly as it does on a real checkpoint, without any network access.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a few milliseconds on a small
built-in English corpus, and all weights are random (``torch.manual_seed(seed)``), float32.

Sizes (language model, all families): 4 decoder layers, hidden 64, 4 attention heads, 2 key/value
heads (GQA, head_dim 16), intermediate 128. Vision towers are 2-layer, width-32 versions of the
real ones. Vision-token counts for ``make_image()`` at its default size (96x80):

* ``llava``       CLIP 84px / patch 14, strategy "default" (CLS dropped): 36 tokens per image.
* ``llava_next``  CLIP 56px / patch 14 tiles, any-res pinpoints (see ``LLAVA_NEXT_PINPOINTS``):
                  base tile (16) + unpadded tile grid + one image-newline per grid row; 70 tokens
                  for 96x80, and different for other sizes/aspect ratios.
* ``qwen2_vl`` / ``qwen2_5_vl``  patch 14, merge 2, ``min_pixels = 36 * 28 * 28``,
                  ``max_pixels = 100 * 28 * 28``: 42 merged tokens for 96x80 (always 36..100).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import PIL.Image

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

# ---------------------------------------------------------------------------------------------
# shared sizes
# ---------------------------------------------------------------------------------------------

TEXT_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
HEAD_DIM = 64 // 4
# Qwen M-RoPE sections (temporal, height, width) in rotary *pairs*: sum must be head_dim / 2.
MROPE_SECTION = [2, 3, 3]
assert sum(MROPE_SECTION) == HEAD_DIM // 2

BPE_BASE_VOCAB = 384  # byte-level BPE vocab (256 bytes + merges + base specials) before added tokens

LLAVA_IMAGE_SIZE = 84  # 6x6 patches of 14 -> 36 tokens
LLAVA_NEXT_IMAGE_SIZE = 56  # 4x4 patches of 14 per tile
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
PATCH = 14
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 36 * 28 * 28
QWEN_MAX_PIXELS = 100 * 28 * 28

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n"
    "{% else %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
USER: What is shown in this image? ASSISTANT: The image shows a red square on a blue background.
Describe the picture in one sentence. There is a small cat sitting next to a large window.
The weather today is sunny with a light breeze, and the children are playing in the park.
What color is the car? The car is green. How many people are in the photo? There are three people.
A man is riding a bicycle along the river while a woman reads a book under a tree.
The table has two cups of coffee, a plate of cookies and an open newspaper on it.
Please answer the question about the image. Is there a dog in the picture? Yes, there is a dog.
The mountains in the distance are covered with snow and the sky is clear and bright.
system user assistant You are a helpful assistant. Picture 1: Picture 2: Compare the two images.
The first image shows a street at night; the second one shows the same street during the day.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 2024 appear in text, as do symbols such as ( ) [ ] { } : ; , . ! ?
"""


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def make_image(seed: int, size: tuple[int, int] = (96, 80)) -> PIL.Image.Image:
    """A deterministic random RGB image of ``size`` = (width, height) (PIL convention).

    A random two-colour gradient background with a handful of random solid blocks on top, so that
    different seeds give clearly different images (and different vision features)."""
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xx / max(width - 1, 1) * np.cos(angle) + yy / max(height - 1, 1) * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    for _ in range(int(rng.integers(4, 9))):
        bw = int(rng.integers(max(2, width // 8), max(3, width // 2)))
        bh = int(rng.integers(max(2, height // 8), max(3, height // 2)))
        x0 = int(rng.integers(0, max(1, width - bw)))
        y0 = int(rng.integers(0, max(1, height - bh)))
        img[y0 : y0 + bh, x0 : x0 + bw] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _train_bpe(base_specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_BASE_VOCAB,
        min_frequency=1,
        special_tokens=base_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def _llava_tokenizer():
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(["<unk>", "<s>", "</s>", "<pad>"])  # ids 0..3, as in Llama
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


QWEN_ADDED_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_tokenizer():
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(["<|endoftext|>"])  # like Qwen: no bos is prepended
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------


def _clip_vision_config(image_size: int) -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
        hidden_act="quick_gelu",
    )


def _llama_text_config(tokenizer) -> dict:
    return dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TEXT_KWARGS,
    )


def _build_llava(next_: bool):
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        text_config=_llama_text_config(tokenizer),
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    if next_:
        config = LlavaNextConfig(
            vision_config=_clip_vision_config(LLAVA_NEXT_IMAGE_SIZE),
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
            image_seq_length=(LLAVA_NEXT_IMAGE_SIZE // PATCH) ** 2,
            **common,
        )
        model_cls = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": LLAVA_NEXT_IMAGE_SIZE},
            crop_size={"height": LLAVA_NEXT_IMAGE_SIZE, "width": LLAVA_NEXT_IMAGE_SIZE},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        )
        proc_cls = LlavaNextProcessor
    else:
        config = LlavaConfig(
            vision_config=_clip_vision_config(LLAVA_IMAGE_SIZE),
            image_seq_length=(LLAVA_IMAGE_SIZE // PATCH) ** 2,
            **common,
        )
        model_cls = LlavaForConditionalGeneration
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": LLAVA_IMAGE_SIZE},
            crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        )
        proc_cls = LlavaProcessor
    processor = proc_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS (dropped again by the "default" strategy)
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    return config, model_cls, processor, tokenizer, dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_qwen(v25: bool):
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_end|>"] + QWEN_ADDED_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(MROPE_SECTION)},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **TEXT_KWARGS,
    )
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if v25:
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
        )

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_KWARGS["hidden_size"],
            patch_size=PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            window_size=112,  # 112 / 14 / 2 = 4x4 merged tokens per attention window
            fullatt_block_indexes=[1],  # layer 0 windowed, layer 1 full attention
            hidden_act="silu",
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
        model_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT_KWARGS["hidden_size"],  # merger output = LM width
            mlp_ratio=2,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **top)
        model_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=QWEN_MERGE,
    )
    processor = _QwenProcessorFiles(proc_cls.__name__, image_processor, tokenizer, QWEN_CHAT_TEMPLATE)
    return config, model_cls, processor, tokenizer, dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )


class _QwenProcessorFiles:
    """Writes the same files that ``Qwen2VLProcessor.save_pretrained`` / ``Qwen2_5_VLProcessor.save_pretrained``
    write (tokenizer.json, tokenizer_config.json, processor_config.json with nested image *and* video
    processor, chat_template.jinja).

    The Qwen processors cannot be *instantiated* without torchvision in transformers 5.x (their
    ``video_processor`` argument is type-checked against ``VideoProcessorMixin``, which only exists with
    torchvision), so the files are written directly. The result is byte-identical to what
    ``save_pretrained`` writes when torchvision is available."""

    def __init__(self, processor_class: str, image_processor, tokenizer, chat_template: str):
        self.processor_class = processor_class
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def save_pretrained(self, path: pathlib.Path) -> None:
        path = pathlib.Path(path)
        self.tokenizer._set_processor_class(self.processor_class)
        self.tokenizer.save_pretrained(path)
        image = json.loads(self.image_processor.to_json_string())
        image.pop("processor_class", None)
        video = {
            k: image[k]
            for k in (
                "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size",
            )
        }
        video.update(
            do_sample_frames=False,
            max_frames=768,
            max_video_tokens=128000,
            min_frames=4,
            return_metadata=False,
            video_processor_type="Qwen2VLVideoProcessor",
        )
        config = {"image_processor": image, "processor_class": self.processor_class, "video_processor": video}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (path / "chat_template.jinja").write_text(self.chat_template)


def build_tiny_checkpoint(family: str, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Writes model weights (safetensors), config, tokenizer, image processor and processor
    (with a chat template) to `path` and returns it."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    if family in ("llava", "llava_next"):
        config, model_cls, processor, tokenizer, gen_ids = _build_llava(next_=family == "llava_next")
    else:
        config, model_cls, processor, tokenizer, gen_ids = _build_qwen(v25=family == "qwen2_5_vl")

    config.dtype = torch.float32
    # Seed a private copy of the CPU RNG so that building a checkpoint does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        # Norm weights start at 1, which leaves a row's direction unchanged; random ones make the
        # final norm matter, so a test can tell DART's normed similarity from a raw one.
        for module in model.model.language_model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    model.generation_config = GenerationConfig(do_sample=False, **gen_ids)

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bar is noise in test logs
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(path)
    return path


__all__ = ["FAMILIES", "build_tiny_checkpoint", "make_image"]
