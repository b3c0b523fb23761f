"""The engine: a loaded model, its three stages, and the core that batches requests over a KV pool."""

from dartserve.engine.pipeline import Engine, GenerationResult, GenerationStats, GeneratorStage, Request, VisionStage

__all__ = ["Engine", "GenerationResult", "GenerationStats", "GeneratorStage", "Request", "VisionStage"]
