"""Property-based fuzzing of the gateway's OpenAPI schema (schemathesis): valid and invalid
requests to every operation, bounded in examples, and not one server error."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from services.config import Settings
from services.gateway.app import create_app
from services.launch import embedded_gateway

EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def api_schema(redis_server):
    # The bundled model answers; batches go to a Redis of the test's own (no worker runs them).
    app = create_app(embedded_gateway(Settings(redis_url=redis_server.url, max_message_mb=1, max_images=2)))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/answer", "/v1/chat/completions", "/v1/batches", "/v1/batches/{batch_id}/cancel"}
    fuzzed = set()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])

        try:
            no_server_error()
            fuzzed.add(operation.path)
        except Unsatisfiable:  # nothing to make invalid: an operation without inputs
            assert mode == GenerationMode.NEGATIVE
    assert fuzzed >= {"/v1/answer", "/v1/chat/completions", "/v1/batches"}
