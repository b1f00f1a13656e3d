"""`fastgrpo vllm-serve`: the command it builds, its refusal to expose weight updates, and its auth middleware."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from dataclasses import dataclass

import pytest

from fastgrpo import serve
from fastgrpo.serve import (FAST_GENERATE_PATH, FastGenerate, RequireApiKey, ServeError, build_command, is_loopback, main,
                            parse_args, sampled_logprobs)


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
    assert flag(cmd, "--middleware") == "fastgrpo.serve.FastGenerate" and cmd.count("--middleware") == 1
    assert "--enable-prefix-caching" not in cmd


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
    # vLLM adds middleware in order and the last added is outermost: the key check must wrap the generate route
    assert env["VLLM_API_KEY"] == "s3cret"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--middleware"] == ["fastgrpo.serve.FastGenerate",
                                                                               "fastgrpo.serve.RequireApiKey"]
    cmd, env = command("--model", "m", "--host", "0.0.0.0", environ={"VLLM_API_KEY": "fromenv"})
    assert env["VLLM_API_KEY"] == "fromenv" and "fastgrpo.serve.RequireApiKey" in cmd


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


# -- the compact generate route ------------------------------------------------------------------------------------
@dataclass
class Flat:
    """The fields of vLLM 0.26's FlatLogprobs that FastGenerate reads: position i's entries are start..end."""
    start_indices: list
    end_indices: list
    token_ids: list
    logprobs: list


@dataclass
class Sample:
    index: int
    token_ids: list
    logprobs: object
    finish_reason: str | None


@pytest.fixture
def fake_vllm(monkeypatch):
    """The three vLLM names FastGenerate imports, as small stand-ins (vLLM is not installed on CPU)."""
    sp_mod, inputs_mod = types.ModuleType("vllm.sampling_params"), types.ModuleType("vllm.inputs")

    class SamplingParams:
        def __init__(self, n=1, max_tokens=16, logprobs=None, seed=None, temperature=1.0, structured_outputs=None):
            if n < 1:
                raise ValueError("n must be at least 1, got 0.")
            self.n, self.max_tokens, self.logprobs, self.seed = n, max_tokens, logprobs, seed
            self.structured_outputs, self.flat_logprobs, self.output_kind = structured_outputs, False, None

    sp_mod.SamplingParams = SamplingParams
    sp_mod.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final-only")
    sp_mod.StructuredOutputsParams = lambda **kw: ("structured", kw)
    inputs_mod.tokens_input = lambda ids: {"type": "token", "prompt_token_ids": ids}
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs_mod)


class Engine:
    """Records what reaches the engine; answers with `samples` (a RequestOutput's `outputs`) or raises `error`."""

    def __init__(self, samples=(), error=None):
        self.samples, self.error, self.seen = list(samples), error, []

    async def generate(self, prompt, params, request_id):
        self.seen.append((prompt, params, request_id))
        if self.error is not None:
            raise self.error
        yield types.SimpleNamespace(outputs=self.samples[:1], finished=False)  # FINAL_ONLY sends one; be robust
        yield types.SimpleNamespace(outputs=self.samples, finished=True)


def _fast(method="POST", path=FAST_GENERATE_PATH, body=b"", engine=None):
    """One request through FastGenerate; returns (status or None if it passed through, decoded JSON answer)."""
    sent, passed = [], []

    async def app(scope, receive, send):
        passed.append(scope["path"])

    chunks = [body[:5], body[5:]] if body else [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": path, "method": method, "headers": [], "root_path": "",
             "app": types.SimpleNamespace(state=types.SimpleNamespace(engine_client=engine))}
    asyncio.run(FastGenerate(app)(scope, receive, send))
    if passed:
        return None, None
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_fast_route_probe_and_passthrough():
    assert _fast("GET") == (200, {"fastgrpo_generate": 1})
    assert _fast(path="/inference/v1/generate") == (None, None)
    assert _fast("PUT")[0] == 405
    assert _fast(body=b'{"token_ids": [1]}')[0] == 503  # no engine yet


@pytest.mark.parametrize("body, match", [(b"{not json", "bad request"), (b'[1, 2]', "JSON object"),
                                         (b'{"token_ids": []}', "token_ids"), (b'{"token_ids": [1, -2]}', "token_ids"),
                                         (b'{"token_ids": [1], "sampling_params": {"n": 0}}', "n must be"),
                                         (b'{"token_ids": [1], "sampling_params": {"bogus": 1}}', "bogus")])
def test_fast_route_rejects_bad_requests(fake_vllm, body, match):
    engine = Engine()
    status, answer = _fast(body=body, engine=engine)
    assert status == 400 and match in answer["error"] and not engine.seen


def test_fast_route_generates_compact_answer(fake_vllm):
    inf = float("-inf")
    samples = [Sample(1, [7, 8], Flat([0, 1], [1, 2], [7, 8], [-0.5, inf]), "length"),
               Sample(0, [5], Flat([0], [2], [9, 5], [-0.1, -2.25]), None)]  # a top-1 entry before the sampled one
    engine = Engine(samples)
    body = {"request_id": "r-1", "token_ids": [3, 4], "sampling_params": {
        "n": 2, "max_tokens": 2, "logprobs": 0, "seed": 5, "output_kind": 0, "structured_outputs": {"regex": "a"}}}
    status, answer = _fast(body=json.dumps(body).encode(), engine=engine)
    assert status == 200 and answer["request_id"] == "r-1"
    assert answer["choices"] == [
        {"index": 1, "token_ids": [7, 8], "logprobs": [-0.5, -9999.0], "finish_reason": "length"},
        {"index": 0, "token_ids": [5], "logprobs": [-2.25], "finish_reason": "stop"}]
    prompt, params, request_id = engine.seen[0]
    assert prompt == {"type": "token", "prompt_token_ids": [3, 4]} and request_id == "r-1"
    assert params.output_kind == "final-only" and params.flat_logprobs and params.n == 2 and params.seed == 5
    assert params.structured_outputs == ("structured", {"regex": "a"})


def test_fast_route_engine_errors(fake_vllm):
    body = b'{"token_ids": [1, 2], "sampling_params": {"max_tokens": 4}}'
    status, answer = _fast(body=body, engine=Engine(error=ValueError("prompt is longer than max_model_len")))
    assert status == 400 and "max_model_len" in answer["error"]
    status, answer = _fast(body=body, engine=Engine(error=RuntimeError("engine core died")))
    assert status == 500 and "engine core died" in answer["error"]
    status, answer = _fast(body=body, engine=Engine([Sample(0, [4], None, "stop")]))
    assert status == 200 and answer["choices"][0]["logprobs"] is None  # logprobs were not asked for


def test_sampled_logprobs_from_dicts_and_missing_entries():
    lp = types.SimpleNamespace
    assert sampled_logprobs([4, 6], [{4: lp(logprob=-1.5), 2: lp(logprob=-0.1)}, {6: lp(logprob=float("nan"))}]) == [
        -1.5, -9999.0]
    with pytest.raises(ValueError, match="position 1"):
        sampled_logprobs([4, 6], [{4: lp(logprob=-1.5)}, None])
    with pytest.raises(ValueError, match="position 0"):
        sampled_logprobs([3], Flat([0], [1], [9], [-0.2]))
