"""Writes docs/configuration.md from the settings' and the pruning methods' declarations
(``make docs``); a test fails when the file and the declarations differ."""

from __future__ import annotations

from services.config import ENVIRONMENT

HEADER = """# Configuration

Every dartserve process reads its settings from `DARTSERVE_*` environment variables; an
unknown `DARTSERVE_*` variable stops it at start. The servers' `--host` and `--port` flags
override `DARTSERVE_HOST` and `DARTSERVE_PORT`.

This file is generated from `services/config.py` and the pruning methods' registrations by
`make docs`; edit the settings there.

| variable | meaning |
|---|---|
"""

FOOTER = """
All services of one deployment must load the same checkpoint with the same dtype. Each one
computes a fingerprint of the weights (the config, the processor, and each tensor's name,
shape, dtype and a sample of its values); cached values carry that fingerprint, and a value
written by other weights is never used.
"""


METHODS = """
## Pruning methods and their settings

A request's `pruning` object (and `DARTSERVE_PRUNING`) names a `method`; every method but
`none` reads `budget` or `ratio` (the amount kept) and `layer` (K; 0 prunes before the LLM),
and the settings below, which each method declares where it is registered
(`dartserve/pruning/`). A setting the method does not read is refused.

| method | layer 0 | its settings |
|---|---|---|
"""

SETTINGS = """
| setting | type | default | meaning |
|---|---|---|---|
"""


def markdown() -> str:
    from dartserve.pruning.registry import all_settings, available_methods, method_spec

    rows = "".join(f"| `{name}` | {meaning} |\n" for name, meaning in ENVIRONMENT.items())
    methods = "".join(
        f"| `{name}` | {'no: it reads attention' if method_spec(name).needs_attention else 'yes'} | "
        f"{', '.join(f'`{s.name}`' for s in method_spec(name).settings) or '–'} |\n"
        for name in available_methods()
    )
    settings = "".join(f"| `{s.name}` | {s.kind.__name__} | {s.default} | {s.help} |\n" for s in all_settings().values())
    return HEADER + rows + FOOTER + METHODS + methods + SETTINGS + settings


if __name__ == "__main__":
    print(markdown(), end="")
