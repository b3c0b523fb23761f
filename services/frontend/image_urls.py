"""Images given by URL. The gateway fetches none unless the URL's host is on the allow-list
(``DARTSERVE_IMAGE_URL_HOSTS``), so a client cannot make it reach into the network behind it.
Redirects are not followed, and a download stops at the size limit."""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from services.frontend.inputs import ApiError

TIMEOUT_S = 10.0
_URL = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect could lead off the allow-list


class ImageUrls:
    def __init__(self, hosts: tuple[str, ...], max_bytes: int) -> None:
        self.hosts, self.max_bytes = tuple(h.lower() for h in hosts), max_bytes
        self._opener = urllib.request.build_opener(_NoRedirects)

    def allowed(self, host: str) -> bool:
        host = host.lower()
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def fetch(self, url: str, param: str) -> bytes:
        # Only what RFC 3986 allows in a URL: no spaces or control characters (CR/LF would go
        # into the request line), no backslash (parsers disagree on where its host ends).
        if not _URL.match(url):
            raise ApiError(400, "an image URL may hold only the characters RFC 3986 allows (percent-encode the others)", param)
        try:
            parsed = urllib.parse.urlsplit(url)
            host = parsed.hostname
        except ValueError:  # an invalid port or IPv6 literal
            host = None
        if parsed.scheme not in ("http", "https") or not host:
            raise ApiError(400, "an image URL must be http(s)://host/...", param)
        if not self.allowed(host):
            raise ApiError(400, f"image URLs from {host!r} are not fetched; send the image as base64 or a data URL", param)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            with self._opener.open(url, timeout=TIMEOUT_S) as reply:
                if reply.status != 200:
                    raise ApiError(400, f"fetching the image gave HTTP {reply.status}", param)
                data = self._read(reply, deadline, param)
        except urllib.error.HTTPError as error:
            raise ApiError(400, f"fetching the image gave HTTP {error.code}", param) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            # HTTPException: what urllib raises for a URL it cannot send or a reply that is not HTTP.
            raise ApiError(400, f"the image could not be fetched: {type(error).__name__}", param) from None
        if len(data) > self.max_bytes:
            raise ApiError(400, f"the image at the URL is over {self.max_bytes} bytes", param)
        if not data:
            raise ApiError(400, "the image at the URL is empty", param)
        return data

    def _read(self, reply, deadline: float, param: str) -> bytes:
        """Up to one byte past the limit, in chunks: the socket's timeout bounds each read, and
        the deadline the whole download, which a server sending a byte at a time cannot stretch."""
        chunks, size = [], 0
        while size <= self.max_bytes:
            if time.monotonic() > deadline:
                raise ApiError(400, f"the image took over {TIMEOUT_S:g} s to download", param)
            chunk = reply.read1(min(1 << 16, self.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
