"""Loading a checkpoint and its processor from the hub or a local folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from transformers.utils import logging as transformers_logging
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from dartserve.models.base import PARTS, ModelAdapter
from dartserve.models.llava import LlavaAdapter
from dartserve.models.llava_next import LlavaNextAdapter
from dartserve.models.qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: cls for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter) for model_type in cls.model_types
}


def load_adapter(model: str, device: str = "cpu", dtype: torch.dtype | None = None, parts: tuple[str, ...] = PARTS) -> ModelAdapter:
    """Loads a Hugging Face checkpoint (hub id or local folder) with its processor; only the
    ``parts`` a process runs go to the device (``ModelAdapter.keep_only``)."""
    check_device(device)
    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except OSError as error:  # no such folder, or a hub id that is not cached while offline
        raise ValueError(f"cannot load model {model!r}: {error}") from None
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    # SDPA: the one attention implementation that takes the per-layer boolean masks a ragged,
    # padded batch needs and still runs fused kernels when there is no padding.
    hf_model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype or "auto", attn_implementation="sdpa")
    adapter = ADAPTERS[model_type](hf_model, load_processor(model, model_type))
    if tuple(parts) != PARTS:
        adapter.keep_only(tuple(parts))
    adapter.model.to(device)
    return adapter


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Loads without transformers' progress bars, which a one-shot answer on a terminal would
    show above the answer."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"not a device: {device!r} ({error})") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: dartserve runs on cpu or cuda")
    return parsed


def load_processor(model: str, model_type: str):
    """The checkpoint's processor; without torchvision, the same processor minus its video part.

    Qwen-VL processors always load a video processor, which imports torchvision; dartserve
    serves images only, so where torchvision is missing the processor is built without it.
    """
    try:
        return AutoProcessor.from_pretrained(model)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
    name = transformers.models.auto.processing_auto.PROCESSOR_MAPPING_NAMES[model_type]
    base = getattr(transformers, name)

    class ImageOnlyProcessor(base):
        @classmethod
        def get_attributes(cls):
            return [attribute for attribute in super().get_attributes() if attribute != "video_processor"]

    ImageOnlyProcessor.__name__ = base.__name__
    return ImageOnlyProcessor.from_pretrained(model)
