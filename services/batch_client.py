"""``dartserve batch``: submitting a JSONL file of requests to a gateway and reading it back."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

POLL_S = 0.5
LOG_EVERY_S = 10.0
PATIENCE_S = 60.0  # how long --wait rides out a gateway that does not answer


class BatchClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def submit(self, jsonl: bytes) -> dict:
        return json.loads(self._call("POST", "/v1/batches", jsonl, {"Content-Type": "application/jsonl"}))

    def status(self, batch_id: str) -> dict:
        return json.loads(self._call("GET", f"/v1/batches/{_quote(batch_id)}"))

    def cancel(self, batch_id: str) -> dict:
        return json.loads(self._call("POST", f"/v1/batches/{_quote(batch_id)}/cancel"))

    def results(self, batch_id: str) -> bytes:
        return self._call("GET", f"/v1/batches/{_quote(batch_id)}/results")

    def wait(self, batch_id: str, stream: TextIO | None = None) -> dict:
        """Polls until the batch finishes, showing its progress on ``stream`` (stderr): a bar on
        a terminal, else a line now and then."""
        stream = stream or sys.stderr
        status = self.status(batch_id)
        with progress(stream, status["request_counts"]["total"]) as show:
            while True:
                show(status)
                if status["status"] in ("completed", "failed", "cancelled"):
                    return status
                time.sleep(POLL_S)
                status = self._status_patiently(batch_id)

    def _status_patiently(self, batch_id: str) -> dict:
        """The status, retried while the gateway is unreachable or answers 503, for a while."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                return self.status(batch_id)
            except Unreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.read()
        except urllib.error.HTTPError as error:
            kind = Unreachable if error.code == 503 else ValueError
            raise kind(f"{method} {path}: HTTP {error.code}: {_message(error.read())}") from None
        except (urllib.error.URLError, OSError) as error:
            raise Unreachable(f"cannot reach the gateway at {self.url}: {getattr(error, 'reason', error)}") from None


@contextmanager
def progress(stream: TextIO, total: int) -> Iterator[Callable[[dict], None]]:
    """A function that shows a batch's status: on a terminal, a progress bar redrawn in place;
    in a log, lines that say what changed (see ``LogLines``)."""
    if not stream.isatty():
        yield LogLines(stream)
        return
    with tqdm(total=total, unit="req", file=stream) as bar:

        def show(status: dict) -> None:
            counts = status["request_counts"]
            bar.update(counts["done"] + counts["failed"] - bar.n)
            bar.set_postfix(status=status["status"], failed=counts["failed"])

        yield show


class LogLines:
    """A batch's progress for a log: a line when its status changes, and while it runs at most
    one every ``LOG_EVERY_S`` that tells of new answers, not one per poll."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.shown, self.last_at = stream, None, -LOG_EVERY_S

    def __call__(self, status: dict) -> None:
        counts = status["request_counts"]
        line = f"{status['id']}: {status['status']}, {counts['done'] + counts['failed']} of {counts['total']} answered, {counts['failed']} failed"
        changed = self.shown is None or status["status"] != self.shown[0]
        if changed or (line != self.shown[1] and time.monotonic() - self.last_at >= LOG_EVERY_S):
            print(line, file=self.stream, flush=True)
            self.shown, self.last_at = (status["status"], line), time.monotonic()


class Unreachable(ValueError):
    """The gateway did not answer, or answered 503: worth trying again."""


def _quote(batch_id: str) -> str:
    return urllib.parse.quote(batch_id, safe="")


def _message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]
