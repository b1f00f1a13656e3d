"""Loopback stand-in for the vLLM 0.26 HTTP endpoints that `VLLMServerGenerator` uses (tests only).

Design choices: stdlib `http.server` (threaded, HTTP/1.0: one request per connection) on 127.0.0.1 with an
ephemeral port, so tests need no vLLM, GPU or network. Answers have vLLM 0.26's JSON shapes (GenerateResponse,
{"status": "paused"}, {"world_size": N}, {"success": bool}, ...). Completions are deterministic functions of the
prompt, seed and sample index (`fake_completion`), and choices come back in reverse index order so that the
client's sorting is exercised. Every request is recorded in `calls`; `faults` injects failures on the paths it
names (default: every path but /health).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the client opens dozens of connections at once; the default backlog (5) resets them
from urllib.parse import parse_qs, urlsplit

from fastgrpo.serve import FAST_GENERATE_PATH

GENERATE = "/inference/v1/generate"
FAST_GENERATE = FAST_GENERATE_PATH  # fastgrpo.serve.FastGenerate's route, served when `fast=True`


@dataclass
class Faults:
    status_5xx: int = 0                 # answer the next N matching requests with HTTP 500
    drop: int = 0                       # close the next N matching connections without any answer
    delay: float = 0.0                  # sleep before answering
    malformed_json: bool = False        # 200 with a body that is not JSON
    truncated: bool = False             # announce more bytes than are sent, then close
    oversized: int = 0                  # announce this Content-Length and send a few bytes
    oversized_stream: int = 0           # stream this many bytes without Content-Length
    wrong_schema: bool = False          # 200 with valid JSON of the wrong shape
    raw: tuple[int, bytes] | None = None  # answer with exactly this status and body
    raw_socket: bytes | None = None     # write these bytes as the whole response (not even HTTP)
    finish_reason: str | None = None    # override every choice's finish_reason
    paths: tuple[str, ...] | None = None  # paths the faults apply to; None = all but /health


@dataclass
class Call:
    method: str
    path: str
    query: dict
    body: object
    auth: str | None


def fake_completion(token_ids: list[int], seed: int | None, j: int, max_tokens: int) -> tuple[list[int], list[float], str]:
    """Sample j of a prompt: deterministic in (prompt, seed, j); length in [1, max_tokens]."""
    base = sum(token_ids) * 31 + len(token_ids)
    rng = random.Random(f"{base}/{seed}/{j}")
    length = rng.randint(1, max_tokens)
    tokens = [(base + 7 * j + k) % 50000 for k in range(length)]
    return tokens, [-5.0 * rng.random() for _ in tokens], "length" if length == max_tokens else "stop"


def generate_response(token_ids: list[int], sp: dict, finish_reason: str | None = None) -> dict:
    n, max_tokens, seed = sp.get("n", 1), sp.get("max_tokens", 16), sp.get("seed")
    choices = []
    for j in reversed(range(n)):
        toks, lps, fin = fake_completion(token_ids, None if seed is None else seed + j, j, max_tokens)
        content = [{"token": f"token_id:{t}", "logprob": lp, "bytes": None,
                    "top_logprobs": [{"token": f"token_id:{t}", "logprob": lp, "bytes": None}]} for t, lp in zip(toks, lps)]
        choices.append({"index": j, "logprobs": {"content": content}, "finish_reason": finish_reason or fin,
                        "token_ids": toks, "routed_experts": None})
    return {"request_id": "generate-tokens-x", "model": "fake-model", "created": int(time.time()), "choices": choices,
            "usage": {"prompt_tokens": len(token_ids), "total_tokens": 0, "completion_tokens": 0},
            "prompt_logprobs": None, "kv_transfer_params": None, "ec_transfer_params": None}


def fast_response(token_ids: list[int], sp: dict, finish_reason: str | None = None) -> dict:
    """The same samples as `generate_response`, in FastGenerate's compact shape (one float per token)."""
    full = generate_response(token_ids, sp, finish_reason)
    return {"request_id": full["request_id"],
            "choices": [{"index": c["index"], "token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
                         "logprobs": [e["logprob"] for e in c["logprobs"]["content"]]} for c in full["choices"]]}


class LoopbackVLLM:
    """`with LoopbackVLLM() as server: ...` serves on `server.url` until the block ends."""

    def __init__(self, port: int = 0, *, api_key: str | None = None, world_size: int = 2, ready_after: float = 0.0,
                 reset_success: bool = True, fast: bool = False) -> None:
        self.api_key, self.world_size, self.reset_success, self.fast = api_key, world_size, reset_success, fast
        self.ready_at = time.monotonic() + ready_after
        self.faults = Faults()
        self.vllm_config = {"model_config": {"dtype": "torch.bfloat16", "logprobs_mode": "processed_logprobs"},
                            "weight_transfer_config": {"backend": "nccl"}}  # the parts of /server_info the client reads
        self.calls: list[Call] = []
        self.paused: str | None = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "LoopbackVLLM":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def paths(self, exclude: tuple[str, ...] = ("/health",)) -> list[str]:
        return [c.path for c in self.calls if c.path not in exclude]

    def take(self, attr: str) -> bool:
        """Consume one unit of a counted fault."""
        with self._lock:
            left = getattr(self.faults, attr)
            if left > 0:
                setattr(self.faults, attr, left - 1)
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    server_version = "loopback-vllm/0.26"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _send(self, status: int, body: object = None, *, raw: bytes | None = None, length: int | None = None) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        owner: LoopbackVLLM = self.server.owner  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        size = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(size) if size else b""
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        with owner._lock:
            owner.calls.append(Call(method, path, query, body, self.headers.get("Authorization")))
        try:
            if self._fault(owner, path):
                return
            self._route(owner, method, path, query, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (e.g. it stopped reading an oversized answer)

    def _fault(self, owner: LoopbackVLLM, path: str) -> bool:
        f = owner.faults
        if (path == "/health") if f.paths is None else (path not in f.paths):
            return False
        if f.delay:
            time.sleep(f.delay)
        if owner.take("drop"):
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        if f.raw_socket is not None:
            self.wfile.write(f.raw_socket)
            self.close_connection = True
            return True
        if owner.take("status_5xx"):
            self._send(500, {"error": {"message": "injected failure", "code": 500}})
        elif f.raw is not None:
            self._send(f.raw[0], raw=f.raw[1])
        elif f.malformed_json:
            self._send(200, raw=b'{"choices": [ this is not json')
        elif f.truncated:
            self._send(200, raw=b'{"choices": []', length=1000)
            self.close_connection = True
        elif f.oversized:
            self._send(200, raw=b'{"x": 1}', length=f.oversized)
            self.close_connection = True
        elif f.oversized_stream:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            block = b" " * 65536
            for _ in range(f.oversized_stream // len(block) + 1):
                self.wfile.write(block)
            self.close_connection = True
        elif f.wrong_schema:
            self._send(200, {"status": "ok", "data": [1, 2, 3]})
        else:
            return False
        return True

    def _route(self, owner: LoopbackVLLM, method: str, path: str, query: dict, body: object) -> None:
        if path == "/health":
            return self._send(200 if time.monotonic() >= owner.ready_at else 503)
        if owner.api_key is not None and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            return self._send(401, {"error": "Unauthorized"})
        simple = {"/start_weight_update": {"message": "Weight update started"},
                  "/finish_weight_update": {"message": "Weight update finished"}}
        if method == "GET" and path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 4096}]})
        elif method == "GET" and path == "/server_info":
            self._send(200, {"vllm_config": owner.vllm_config, "vllm_env": {}, "system_env": {}})
        elif method == "GET" and path == "/get_world_size":
            self._send(200, {"world_size": owner.world_size})
        elif method == "GET" and path == FAST_GENERATE and owner.fast:
            self._send(200, {"fastgrpo_generate": 1})
        elif method == "POST" and (path == GENERATE or (path == FAST_GENERATE and owner.fast)):
            if not isinstance(body, dict) or not body.get("token_ids") or not isinstance(body.get("sampling_params"), dict):
                return self._send(400, {"error": {"message": "invalid GenerateRequest", "code": 400}})
            answer = fast_response if path == FAST_GENERATE else generate_response
            self._send(200, answer(body["token_ids"], body["sampling_params"], owner.faults.finish_reason))
        elif method == "POST" and path == "/pause":
            owner.paused = query.get("mode", "abort")
            self._send(200, {"status": "paused"})
        elif method == "POST" and path == "/resume":
            owner.paused = None
            self._send(200, {"status": "resumed"})
        elif method == "POST" and path == "/init_weight_transfer_engine":
            if not isinstance(body, dict) or "init_info" not in body:
                return self._send(400, {"detail": "Missing 'init_info' in request body"})
            self._send(200, {"message": "Weight transfer initialized"})
        elif method == "POST" and path == "/update_weights":
            if not isinstance(body, dict) or "update_info" not in body:
                return self._send(400, {"detail": "Missing 'update_info' in request body"})
            self._send(200, {"message": "Weights updated"})
        elif method == "POST" and path in simple:
            self._send(200, simple[path])
        elif method == "POST" and path == "/reset_prefix_cache":
            self._send(200, {"success": owner.reset_success})
        elif method == "POST" and path in ("/sleep", "/wake_up"):
            self._send(200)
        else:
            self._send(404, {"detail": "Not Found"})
