"""dartserve's network adapters: the gRPC services and the REST gateway around the engine stages."""
