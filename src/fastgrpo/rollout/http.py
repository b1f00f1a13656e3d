"""JSON over HTTP to a vLLM server, with the standard library only: the errors the trainer sees, and `Http`,
whose every wait is bounded (connect, headers and each read share one deadline per attempt; bodies over
`max_response_bytes` are refused) and whose transient failures (connection refused/reset/dropped, truncated body,
HTTP 5xx) are retried with exponential backoff a bounded number of times. Design notes: rollout/vllm_client.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

logger = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 256 << 20


class ServerError(RuntimeError):
    """The vLLM server failed: unreachable, erroring, or answering nonsense. The trainer catches it, writes a
    checkpoint and stops with this message."""

    resumable = True  # the trainer saves a checkpoint before stopping


class ServerRequestError(ServerError):
    """The server rejected a request (HTTP 4xx): wrong API key, missing endpoint, invalid sampling parameters."""

    status: int | None = None  # the HTTP status, when the server sent one


class ServerProtocolError(ServerError):
    """The server's answer is not what vLLM 0.26 sends: not JSON, oversized, or of the wrong shape."""


class WeightSyncError(ServerError):
    """Pushing weights to the server failed; the server is left paused with partially updated weights."""


class _Transient(Exception):
    """An attempt failed in a way worth retrying (connection refused/reset/dropped, truncated body, HTTP 5xx)."""


class _Timeout(_Transient):
    """An attempt ran out of time; retried only while waiting for readiness."""


class Http:
    """Small JSON-over-HTTP client: per-attempt deadline, response size cap, bounded retries with backoff."""

    def __init__(self, base_url: str, api_key: str | None = None, *, max_retries: int = 4, backoff: float = 0.5,
                 backoff_max: float = 8.0, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 connect_timeout: float = 10.0, hint: str = "") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"vLLM server URL {base_url!r} must look like http://HOST:PORT")
        self.url = base_url.rstrip("/")
        self.host = parts.hostname
        self._conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.api_key, self.max_retries, self.backoff, self.backoff_max = api_key, max_retries, backoff, backoff_max
        self.max_response_bytes, self.connect_timeout, self.hint = max_response_bytes, connect_timeout, hint
        self.retries = 0  # cumulative, for stats()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None, timeout: float,
                retry: bool = True) -> Any:
        """Send, retrying transient failures when `retry`; return the decoded JSON (None for an empty body)."""
        tries = 1 + (self.max_retries if retry else 0)
        last = ""
        for attempt in range(tries):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2))
            try:
                return self.attempt(method, path, body=body, params=params, timeout=timeout)
            except _Timeout:
                raise ServerError(f"vLLM server at {self.url} did not answer {method} {path} within {timeout:g} s."
                                  f"{self.hint}") from None
            except _Transient as e:
                last = str(e)
                if attempt + 1 < tries:
                    logger.warning("vLLM server at %s: %s %s failed (%s); retrying", self.url, method, path, last)
        raise ServerError(f"vLLM server at {self.url} stopped answering after {tries} "
                          f"tr{'y' if tries == 1 else 'ies'} of {method} {path}: {last}.{self.hint}")

    def attempt(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                timeout: float) -> Any:
        """One try. Raises _Transient/_Timeout (retryable) or ServerRequestError/ServerProtocolError (final)."""
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        what = f"{method} {path}"
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"Connection": "close", "Accept": "application/json", "Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + timeout
        conn = self._conn_cls(self.host, self._port, timeout=min(timeout, self.connect_timeout))
        try:
            conn.connect()
            sock = conn.sock
            sock.settimeout(_left(deadline))
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            raw = self._read(resp, sock, deadline, what)
            status = resp.status
        except (TimeoutError, socket.timeout) as e:
            raise _Timeout(str(e) or "timed out") from None
        except (ConnectionError, http.client.IncompleteRead, OSError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        except http.client.HTTPException as e:  # garbage status line, header line too long, too many headers
            raise ServerProtocolError(f"vLLM server at {self.url} sent an invalid HTTP answer to {what} "
                                      f"({type(e).__name__}: {str(e)[:200]}).{self.hint}") from None
        finally:
            conn.close()
        if 200 <= status < 300:
            return self._json(raw, what)
        text = raw[:500].decode("utf-8", "replace")
        if status >= 500:
            raise _Transient(f"HTTP {status}: {text}")
        if 400 <= status < 500:
            err = ServerRequestError(f"vLLM server at {self.url} rejected {what} with HTTP {status}: {text}. "
                                     f"{_hint_4xx(status, path)}")
            err.status = status
            raise err
        raise ServerProtocolError(f"vLLM server at {self.url} answered {what} with unexpected HTTP {status}.{self.hint}")

    def _read(self, resp: http.client.HTTPResponse, sock: socket.socket, deadline: float, what: str) -> bytes:
        length_header = resp.getheader("Content-Length")
        length = None
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                raise ServerProtocolError(f"vLLM server at {self.url} sent Content-Length {length_header[:40]!r} "
                                          f"for {what}.{self.hint}") from None
            if length > self.max_response_bytes:
                raise ServerProtocolError(f"vLLM server at {self.url} announced a {length}-byte answer to {what}, "
                                          f"over the {self.max_response_bytes}-byte cap.{self.hint}")
        chunks, total = [], 0
        while not resp.isclosed():  # http.client closes the socket once the announced length has arrived
            sock.settimeout(_left(deadline))
            block = resp.read(1 << 16)
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > self.max_response_bytes:
                raise ServerProtocolError(f"vLLM server at {self.url} sent more than {self.max_response_bytes} bytes "
                                          f"for {what}.{self.hint}")
        if length is not None and total < length:
            raise _Transient(f"truncated answer: {total} of {length} bytes")
        return b"".join(chunks)

    def _json(self, raw: bytes, what: str) -> Any:
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
            raise ServerProtocolError(f"vLLM server at {self.url} answered {what} with invalid JSON "
                                      f"({type(e).__name__}: {str(e)[:100]}): {raw[:80]!r}.{self.hint}") from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _hint_4xx(status: int, path: str) -> str:
    if status in (401, 403):
        return ("The API key is missing or wrong: set vllm_server_api_key (or VLLM_API_KEY) to the key the server was "
                "started with.")
    if status == 404:
        return (f"This server has no {path}: start it with `fastgrpo vllm-serve --model MODEL` (vLLM >= 0.26; it sets "
                "VLLM_SERVER_DEV_MODE=1 and the NCCL weight-transfer config).")
    return "The server rejected the request; its message above says why."
