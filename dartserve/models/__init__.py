"""Model adapters, one per family, and the decoding settings."""

from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.models.decode import SamplingConfig
from dartserve.models.loading import ADAPTERS, load_adapter

__all__ = ["ADAPTERS", "EncodedPrompt", "ModelAdapter", "SamplingConfig", "load_adapter"]
