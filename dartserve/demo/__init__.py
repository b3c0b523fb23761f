"""The bundled demo: a synthetic visual question-answering task and a small LLaVA trained on it."""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT = Path(__file__).parent / "checkpoint"


def default_model() -> str:
    """The model used when none is named: ``$DARTSERVE_MODEL``, else the bundled demo checkpoint."""
    return os.environ.get("DARTSERVE_MODEL") or str(CHECKPOINT)
