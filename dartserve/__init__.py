"""dartserve: serving multimodal LLMs with DART visual-token pruning."""

__version__ = "0.1.0"
