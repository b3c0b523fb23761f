"""TLS between the gateway (or a worker) and the gRPC stages: server-side, or mutual when a
stage names the CA of its clients. Certificates and keys are PEM files named by settings."""

from __future__ import annotations

import grpc


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """None when the stage serves plaintext."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ValueError("DARTSERVE_TLS_CLIENT_CA needs DARTSERVE_TLS_CERT and DARTSERVE_TLS_KEY")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("DARTSERVE_TLS_CERT and DARTSERVE_TLS_KEY go together")
    client_ca = _read("DARTSERVE_TLS_CLIENT_CA", settings.tls_client_ca) if settings.tls_client_ca else None
    pair = (_read("DARTSERVE_TLS_KEY", settings.tls_key), _read("DARTSERVE_TLS_CERT", settings.tls_cert))
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel(address: str, settings, options: list) -> grpc.Channel:
    """A channel to a stage: TLS when DARTSERVE_TLS_CA is set, with a client certificate when one is named."""
    if not settings.tls_ca:
        if settings.tls_client_cert or settings.tls_client_key:
            raise ValueError("DARTSERVE_TLS_CLIENT_CERT needs DARTSERVE_TLS_CA")
        return grpc.insecure_channel(address, options=options)
    if bool(settings.tls_client_cert) != bool(settings.tls_client_key):
        raise ValueError("DARTSERVE_TLS_CLIENT_CERT and DARTSERVE_TLS_CLIENT_KEY go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("DARTSERVE_TLS_CA", settings.tls_ca),
        private_key=_read("DARTSERVE_TLS_CLIENT_KEY", settings.tls_client_key) if settings.tls_client_key else None,
        certificate_chain=_read("DARTSERVE_TLS_CLIENT_CERT", settings.tls_client_cert) if settings.tls_client_cert else None,
    )
    return grpc.secure_channel(address, credentials, options=options)


def _read(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None
