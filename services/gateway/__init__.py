"""The REST gateway: /v1/answer, the OpenAI-compatible chat API, health and metrics."""
