"""`fastgrpo vllm-serve`: the command it builds, its refusal to expose weight updates, and its auth middleware."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from fastgrpo import serve
from fastgrpo.serve import RequireApiKey, ServeError, build_command, is_loopback, main, parse_args


def command(*argv, environ=None):
    return build_command(parse_args(list(argv)), environ or {})


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_default_command_is_loopback_dev_mode_nccl_processed_logprobs():
    cmd, env = command("--model", "Qwen/Qwen3-0.6B")
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "Qwen/Qwen3-0.6B"]
    assert flag(cmd, "--host") == "127.0.0.1" and flag(cmd, "--port") == "8000"
    assert json.loads(flag(cmd, "--weight-transfer-config")) == {"backend": "nccl"}
    assert flag(cmd, "--logprobs-mode") == "processed_logprobs"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "VLLM_API_KEY" not in env
    assert "--middleware" not in cmd and "--enable-prefix-caching" not in cmd


def test_options_and_passthrough():
    cmd, _ = command("vllm-serve", "--model", "m", "--tensor-parallel-size", "2", "--data-parallel-size", "4",
                     "--port", "9000", "--gpu-memory-utilization", "0.8", "--max-model-len", "4096",
                     "--enable-prefix-caching", "--dtype", "bfloat16", "--enable-sleep-mode", "--max-num-seqs=512")
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--data-parallel-size") == "4"
    assert flag(cmd, "--port") == "9000" and flag(cmd, "--gpu-memory-utilization") == "0.8"
    assert flag(cmd, "--max-model-len") == "4096" and "--enable-prefix-caching" in cmd
    assert cmd[-4:] == ["--dtype", "bfloat16", "--enable-sleep-mode", "--max-num-seqs=512"]


def test_environment_is_kept():
    _, env = command("--model", "m", environ={"CUDA_VISIBLE_DEVICES": "2,3", "VLLM_SERVER_DEV_MODE": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "myhost.example", "192.168.0.5"])
def test_remote_host_without_key_refused(host):
    with pytest.raises(ServeError, match="replace the model's weights") as info:
        command("--model", "m", "--host", host)
    assert "--api-key" in str(info.value) and "--allow-remote-without-key" in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_key(host):
    cmd, _ = command("--model", "m", "--host", host)
    assert flag(cmd, "--host") == host and is_loopback(host)


def test_remote_host_with_key_uses_env_and_middleware():
    cmd, env = command("--model", "m", "--host", "0.0.0.0", "--api-key", "s3cret")
    assert "s3cret" not in " ".join(cmd)  # `ps` must not show it
    assert env["VLLM_API_KEY"] == "s3cret" and flag(cmd, "--middleware") == "fastgrpo.serve.RequireApiKey"
    cmd, env = command("--model", "m", "--host", "0.0.0.0", environ={"VLLM_API_KEY": "fromenv"})
    assert env["VLLM_API_KEY"] == "fromenv" and "--middleware" in cmd


def test_remote_host_opt_out():
    cmd, env = command("--model", "m", "--host", "0.0.0.0", "--allow-remote-without-key")
    assert flag(cmd, "--host") == "0.0.0.0" and "VLLM_API_KEY" not in env


@pytest.mark.parametrize("argv", [["--tensor-parallel-size", "0"], ["--port", "70000"],
                                  ["--gpu-memory-utilization", "1.5"], ["--max-model-len", "0"]])
def test_invalid_sizes(argv):
    with pytest.raises(ServeError):
        command("--model", "m", *argv)


def test_main_refuses_with_exit_code(capsys, monkeypatch):
    monkeypatch.setattr(serve.os, "execvpe", lambda *a: pytest.fail("must not start vLLM"))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main(["--model", "m", "--host", "0.0.0.0"]) == 2
    assert "replace the model's weights" in capsys.readouterr().err


def test_main_execs_vllm(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(serve.os, "execvpe", lambda file, args, env: seen.update(file=file, args=args, env=env))
    monkeypatch.setenv("VLLM_API_KEY", "k")
    main(["--model", "m", "--port", "8123"])
    assert seen["file"] == sys.executable and flag(seen["args"], "--port") == "8123"
    assert seen["env"]["VLLM_SERVER_DEV_MODE"] == "1" and "k" not in capsys.readouterr().err.split()


def test_main_without_vllm(monkeypatch, capsys):
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(serve.os, "execvpe", lambda *a: pytest.fail("must not exec"))
    assert main(["--model", "m"]) == 1
    assert "vLLM is not installed" in capsys.readouterr().err


# -- the middleware ------------------------------------------------------------------------------------------------
def _call(path, *, auth=None, kind="http", method="POST"):
    """Run one request through RequireApiKey; return (reached the app, messages sent back)."""
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    mw = RequireApiKey(app)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(msg):
        sent.append(msg)

    headers = [(b"authorization", auth.encode())] if auth else []
    asyncio.run(mw({"type": kind, "path": path, "method": method, "headers": headers, "root_path": ""}, receive, send))
    return bool(reached), sent


def test_middleware_guards_every_path_but_health(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "k3y")
    for path in ("/update_weights", "/pause", "/collective_rpc", "/v1/models", "/inference/v1/generate"):
        ok, sent = _call(path)
        assert not ok and sent[0]["status"] == 401
        assert not _call(path, auth="Bearer wrong")[0] and not _call(path, auth="Basic k3y")[0]
        assert _call(path, auth="Bearer k3y")[0]
    assert _call("/health", method="GET")[0]
    ok, sent = _call("/update_weights", kind="websocket")
    assert not ok and sent == [{"type": "websocket.close", "code": 1008}]


def test_middleware_app_is_called(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "k3y")
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    mw = RequireApiKey(app)
    asyncio.run(mw({"type": "lifespan"}, None, None))
    assert reached == ["lifespan"]


def test_middleware_fails_closed_without_key(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        RequireApiKey(lambda *a: None)
