"""`fastgrpo vllm-serve`: a thin launcher for the vLLM 0.26 server that `vllm_mode="server"` trains against.

Design choices
--------------
* It only builds a command line and `os.execvpe`s it: the running process *is* vLLM (signals, exit codes and logs
  are vLLM's own; nothing of fastgrpo stays resident). `build_command` is pure so tests can check it.
* Command: `<this python> -m vllm.entrypoints.cli.main serve MODEL ...` (the module behind vLLM's `vllm` console
  script, vllm-0.26.0.dist-info/entry_points.txt). Using `sys.executable` runs the vLLM of the environment that has
  fastgrpo, whatever `vllm` is first on PATH.
* What server mode needs from vLLM 0.26 (see fastgrpo.rollout.vllm_client for the endpoint schemas):
  `VLLM_SERVER_DEV_MODE=1` (mounts /pause, /resume, /init_weight_transfer_engine, /start_weight_update,
  /update_weights, /finish_weight_update, /get_world_size, /reset_prefix_cache, /sleep, /wake_up),
  `--weight-transfer-config '{"backend": "nccl"}'` (weights arrive over an NCCL broadcast from the trainer) and
  `--logprobs-mode processed_logprobs` (returned logprobs are after temperature/top-k/top-p, as the trainer's are).
* Security. vLLM's own `--api-key` guards only paths under /v1, /v2 and /inference
  (vllm/entrypoints/serve/utils/server_utils.py, GUARDED_PREFIX); the dev endpoints above, and /collective_rpc,
  stay open to anyone who can reach the port, and they let a caller replace the model's weights. So:
  - the default host is 127.0.0.1, and a non-loopback host is refused without an API key unless
    --allow-remote-without-key is given;
  - with a key, the launcher also installs `RequireApiKey` (below) through vLLM's `--middleware`, which demands the
    key on every path except GET /health, dev endpoints included;
  - the key travels in the environment (VLLM_API_KEY, which vLLM and the middleware both read), never in the
    command line, where `ps` would show it to every user of the machine.
  The NCCL stream itself (trainer port `vllm_group_port`) is neither authenticated nor encrypted: keep trainer and
  server on a private network.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence

__all__ = ["main", "build_command", "parse_args", "ServeError", "RequireApiKey", "is_loopback"]

VLLM_MODULE = "vllm.entrypoints.cli.main"
WEIGHT_TRANSFER_CONFIG = json.dumps({"backend": "nccl"})
MIDDLEWARE = "fastgrpo.serve.RequireApiKey"


class ServeError(ValueError):
    """The launcher's arguments are unsafe or invalid; the message says why and what to pass instead."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach. Names other than `localhost` count as remote (a name can
    resolve to anything), and so do the wildcards 0.0.0.0 and ::, which listen on every interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastgrpo vllm-serve",
        description="Start a vLLM server that fastgrpo trains against (GRPOConfig(use_vllm=True, vllm_mode='server')). "
        "Arguments not listed here are passed to `vllm serve` unchanged.",
        allow_abbrev=False,  # an abbreviation must never swallow an option meant for vLLM
    )
    p.add_argument("--model", required=True, help="Model name or path; must match the trainer's model.")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model replica.")
    p.add_argument("--data-parallel-size", type=int, default=1, help="Model replicas.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (the trainer's vllm_server_port).")
    p.add_argument("--api-key", default=None, help="Key the trainer must send (its vllm_server_api_key or VLLM_API_KEY). "
                   "Defaults to the VLLM_API_KEY environment variable.")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="Fraction of each GPU vLLM may use.")
    p.add_argument("--max-model-len", type=int, default=None, help="Context length (prompt + completion tokens).")
    p.add_argument("--enable-prefix-caching", action="store_true", help="Share KV cache between a prompt's samples.")
    p.add_argument("--allow-remote-without-key", action="store_true",
                   help="Listen on a non-loopback host without an API key (trusted private networks only).")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse launcher options; unknown ones are kept, in order, in `.extra` for vLLM."""
    argv = list(argv)
    if argv[:1] == ["vllm-serve"]:
        argv = argv[1:]
    args, extra = _parser().parse_known_args(argv)
    args.extra = extra
    return args


def build_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that start the server. Pure: reads nothing but `args` and `environ` (default: os.environ).

    Raises ServeError for invalid sizes and for a non-loopback host without an API key."""
    base_env = dict(os.environ if environ is None else environ)
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port must be in 1..65535, got {args.port}.")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise ServeError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}.")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ServeError(f"--max-model-len must be >= 1, got {args.max_model_len}.")
    if any(a == "--api-key" or a.startswith("--api-key=") for a in args.extra):
        raise ServeError("Pass the API key once, as --api-key before the vLLM arguments (it is then kept out of the command line).")

    api_key = args.api_key or base_env.get("VLLM_API_KEY") or None
    if not is_loopback(args.host) and api_key is None and not args.allow_remote_without_key:
        raise ServeError(
            f"Refusing to listen on --host {args.host} without an API key: this server's weight-update endpoints "
            "(/init_weight_transfer_engine, /update_weights, /pause, ...) let any caller who can reach the port replace "
            "the model's weights, and /collective_rpc runs methods on its GPU workers. Either keep the default "
            "--host 127.0.0.1 (trainer on this machine), pass --api-key KEY (or set VLLM_API_KEY) and give the trainer "
            "the same key (vllm_server_api_key or VLLM_API_KEY), or, on a trusted private network only, pass "
            "--allow-remote-without-key."
        )

    cmd = [sys.executable, "-m", VLLM_MODULE, "serve", args.model,
           "--host", args.host, "--port", str(args.port),
           "--tensor-parallel-size", str(args.tensor_parallel_size),
           "--data-parallel-size", str(args.data_parallel_size),
           "--weight-transfer-config", WEIGHT_TRANSFER_CONFIG,
           "--logprobs-mode", "processed_logprobs"]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", repr(float(args.gpu_memory_utilization))]
    if args.max_model_len is not None:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.enable_prefix_caching:
        cmd += ["--enable-prefix-caching"]
    env = base_env
    env["VLLM_SERVER_DEV_MODE"] = "1"
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
        cmd += ["--middleware", MIDDLEWARE]
    cmd += list(args.extra)
    return cmd, env


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastgrpo vllm-serve`. Returns an exit code on error; on success it never returns."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cmd, env = build_command(args)
    except ServeError as e:
        print(f"fastgrpo vllm-serve: error: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("vllm") is None:
        print(f"fastgrpo vllm-serve: error: vLLM is not installed in {sys.executable}. Install it on the GPU host "
              "(pip install 'vllm==0.26.*') and run this command with that Python.", file=sys.stderr)
        return 1
    if not is_loopback(args.host) and env.get("VLLM_API_KEY") is None:
        print(f"fastgrpo vllm-serve: WARNING: listening on {args.host} without an API key; anyone who can reach port "
              f"{args.port} can replace the model's weights.", file=sys.stderr)
    shown = " ".join(cmd[1:])
    print(f"fastgrpo vllm-serve: VLLM_SERVER_DEV_MODE=1 {sys.executable} {shown}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


class RequireApiKey:
    """ASGI middleware (installed in vLLM with `--middleware fastgrpo.serve.RequireApiKey`) that requires
    `Authorization: Bearer $VLLM_API_KEY` on every HTTP and websocket path except /health, unlike vLLM's own check,
    which leaves the dev (weight-update) endpoints open. Fails closed: without VLLM_API_KEY it raises when Starlette
    builds its middleware stack (at the first request), so nothing is served unguarded. Dependency-free (no starlette
    import); Starlette constructs it as `RequireApiKey(app)`."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app) -> None:
        key = os.environ.get("VLLM_API_KEY")
        if not key:
            raise RuntimeError("fastgrpo.serve.RequireApiKey needs the VLLM_API_KEY environment variable.")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    # Compare digests: constant time and independent of the key's length.
                    return secrets.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path in self.OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"error": "Unauthorized"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    sys.exit(main())
