"""Writes docs/configuration.md from the settings' declarations (``make docs``); a test fails
when the file and the declarations differ."""

from __future__ import annotations

from services.config import ENVIRONMENT

HEADER = """# Configuration

Every dartserve process reads its settings from `DARTSERVE_*` environment variables; an
unknown `DARTSERVE_*` variable stops it at start. The servers' `--host` and `--port` flags
override `DARTSERVE_HOST` and `DARTSERVE_PORT`.

This file is generated from `services/config.py` by `make docs`; edit the settings there.

| variable | meaning |
|---|---|
"""

FOOTER = """
All services of one deployment must load the same checkpoint with the same dtype. Each one
computes a fingerprint of the weights (the config, the processor, and each tensor's name,
shape, dtype and a sample of its values); cached values carry that fingerprint, and a value
written by other weights is never used.
"""


def markdown() -> str:
    rows = "".join(f"| `{name}` | {meaning} |\n" for name, meaning in ENVIRONMENT.items())
    return HEADER + rows + FOOTER


if __name__ == "__main__":
    print(markdown(), end="")
