"""The committed gRPC stubs are exactly what ``make proto`` generates from ``proto/``."""

from pathlib import Path

from services.rpc.codegen import OUT, generate


def test_committed_stubs_are_fresh(tmp_path):
    generated = generate(tmp_path)
    assert generated
    for path in generated:
        committed = OUT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run make proto"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run make proto"
    committed_stubs = {p.relative_to(OUT) for p in (OUT / "dartserve").rglob("*.py*")}
    assert committed_stubs == {p.relative_to(tmp_path) for p in generated}, "stubs without a proto: run make proto"


def test_protos_are_versioned():
    protos = sorted(Path(OUT.parents[1], "proto", "dartserve", "v1").glob("*.proto"))
    assert [p.name for p in protos] == ["common.proto", "generator.proto", "pruner.proto", "vision.proto"]
    assert all("package dartserve.v1;" in p.read_text() for p in protos)
