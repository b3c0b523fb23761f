"""The gateway's HTTP/1.1 protocol: uvicorn's h11 protocol, whose answer to a request it cannot
parse (an invalid Content-Length, a malformed header) is JSON like every other error, not
plain text. Such a request never reaches the app, so nothing else could answer it."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BODY = json.dumps({"error": {"type": "invalid_request_error", "message": "the request is not valid HTTP/1.1 (its Content-Length, a header, or its framing)", "param": None}}).encode()


class JsonErrorsH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=_BODY), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
