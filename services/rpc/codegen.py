"""Generates the gRPC stubs from ``proto/`` (``make proto``); a test fails when they are stale.

protoc writes imports for the proto package path (``from dartserve.v1 import ...``), which
would resolve to the library package ``dartserve``; they are rewritten to this package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
OUT = Path(__file__).resolve().parent
PACKAGE = "services.rpc"


def generate(out: Path = OUT) -> list[Path]:
    """Writes the stubs under ``out/dartserve/v1``; returns their paths."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "dartserve" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        include = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted(Path(raw).rglob("*.py*")):
            target = out / path.relative_to(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = re.sub(r"^from dartserve\.v1 import", f"from {PACKAGE}.dartserve.v1 import", path.read_text(), flags=re.M)
            target.write_text(text)
            written.append(target)
    for folder in (out / "dartserve", out / "dartserve" / "v1"):
        (folder / "__init__.py").write_text("")
        written.append(folder / "__init__.py")
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
