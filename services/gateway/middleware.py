"""What every request to the gateway passes through, outermost first, as plain ASGI layers (no
buffering, so streams pass through as they are):

- ``RequestLog``: the request id, one log line, and the request counted in the metrics under
  the status it got, whichever layer answered it; a bug is a JSON 500, a client that hung up
  before its answer a 499 (no traceback: nothing failed);
- ``ApiKeys``: a 401 without a valid key; the caller's tenant for the layers inside;
- ``BodyGuard``: a body's declared length (400 when it is not one number), its size (413) and
  how long it may take to arrive (408), so a client that uploads slowly holds nothing that other
  requests need.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import anyio
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.routing import Match

from services import request_ids
from services.frontend.inputs import ApiError

log = logging.getLogger(__name__)
CLIENT_LEFT = 499  # nginx's status for a client that closed the connection before the answer ended
SERVER_ERROR = {"error": {"type": "server_error", "message": "the server failed to answer; its log says why", "param": None}}
COUNTED_BY_STREAM = "dartserve.counted_by_stream"  # scope["state"] flag: a stream counts itself when it ends
TENANT = "dartserve.tenant"  # scope["state"]: whose request it is ("" on a gateway without keys)


def state(scope) -> dict:
    """The request's state, shared by the layers and the route (Starlette's ``request.state``)."""
    return scope.setdefault("state", {})


class RequestLog:
    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_ids.accept(_header(scope, b"x-request-id"))
        request_ids.current.set(rid)
        started = time.perf_counter()
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # hung up mid-upload: nobody is left to answer
            status = CLIENT_LEFT
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if status is None:
                await JSONResponse(SERVER_ERROR, status_code=500)(scope, receive, send_with_id)
        status = status or CLIENT_LEFT  # the app returned without answering: its client was gone
        if not state(scope).get(COUNTED_BY_STREAM):
            self.metrics.requests.labels(endpoint(scope), str(status)).inc()
        fields = {"method": scope["method"], "path": scope["path"], "status": status, "ms": round((time.perf_counter() - started) * 1e3, 2)}
        log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


class ApiKeys:
    """With keys, every path but the open ones needs ``Authorization: Bearer KEY``. Keys are
    bytes as sent (UTF-8 keys work) and compared in constant time. The tenant of a request is
    a digest of its key, never the key: batches and conversations belong to it."""

    def __init__(self, app, keys: tuple[str, ...], open_paths: tuple[str, ...]) -> None:
        self.app, self.open_paths = app, open_paths
        self.keys = tuple(key.encode() for key in keys)
        self.tenants = {key: hashlib.sha256(key).hexdigest()[:32] for key in self.keys}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys:
            return await self.app(scope, receive, send)
        key = self._key(scope)
        if key is None and scope["path"] not in self.open_paths:
            error = ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", kind="authentication_error")
            return await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        state(scope)[TENANT] = self.tenants.get(key, "")
        await self.app(scope, receive, send)

    def _key(self, scope) -> bytes | None:
        scheme, _, given = (_raw_header(scope, b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        given = given.strip()
        # Every key is compared, each in constant time: the time taken tells nothing about any key.
        matches = [hmac.compare_digest(given, key) for key in self.keys]
        return self.keys[matches.index(True)] if any(matches) else None


def tenant(request) -> str:
    return state(request.scope).get(TENANT, "")


class BodyGuard:
    """It must sit next to the app, inside the other layers: its errors, raised while the app
    reads the body, then reach the app's error handlers like any other."""

    def __init__(self, app, limit_for, timeout_s: float) -> None:
        self.app, self.limit_for, self.timeout_s = app, limit_for, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        lengths = [value for name, value in scope["headers"] if name == b"content-length"]
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                error = ApiError(400, "Content-Length must be one number of bytes", "Content-Length")
                return await _refuse(error, scope, receive, send)
            if int(lengths[0]) > limit:
                return await _refuse(_too_large(limit), scope, receive, send)
        deadline = anyio.current_time() + self.timeout_s
        received, complete = 0, False

        async def guarded():
            nonlocal received, complete
            if complete:  # what comes after the body (a disconnect) may take its time
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()):
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    complete = not message.get("more_body", False)
                    if received > limit:
                        raise _too_large(limit)
                return message
            raise ApiError(408, f"the body did not arrive within {self.timeout_s:g} s", kind="request_timeout", headers={"Connection": "close"})

        await self.app(scope, guarded, send)


async def _refuse(error: ApiError, scope, receive, send) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over the limit of {limit} bytes", kind="request_too_large", headers={"Connection": "close"})


def endpoint(scope) -> str:
    """The route's path template: a label per endpoint, not per path a client made up. A
    request answered before routing (a 401, a 413) is matched against the routes here."""
    route = scope.get("route")
    if route is None:
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return getattr(route, "path", "unmatched")


def _raw_header(scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _header(scope, name: bytes) -> str | None:
    value = _raw_header(scope, name)
    return value.decode("latin-1") if value is not None else None
