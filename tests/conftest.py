import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from dartserve.engine import Engine  # noqa: E402
from processes import RedisServer  # noqa: E402
from tiny_checkpoints import FAMILIES, build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def engines(checkpoints):
    return {family: Engine.load(str(path)) for family, path in checkpoints.items()}


@pytest.fixture(params=FAMILIES)
def engine(request, engines):
    return engines[request.param]


@pytest.fixture(scope="module")
def redis_server():
    """A redis-server of the test module's own (tests stop and restart it)."""
    server = RedisServer()
    yield server
    server.stop()
