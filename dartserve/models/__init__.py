"""Model adapters, one per family, and the generic prefill and decode loops."""

from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.models.decode import SamplingConfig, decode
from dartserve.models.loading import ADAPTERS, load_adapter
from dartserve.models.prefill import PrefillResult, prefill

__all__ = ["ADAPTERS", "EncodedPrompt", "ModelAdapter", "PrefillResult", "SamplingConfig", "decode", "load_adapter", "prefill"]
