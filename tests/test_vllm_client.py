"""VLLMServerGenerator against a real HTTP loopback stand-in of vLLM 0.26 (tests/loopback_vllm.py).

Only the NCCL broadcast is stubbed (no NCCL on CPU); every HTTP call is real. Each failure mode must end in a
ServerError (or a valid Generation) within a bounded time.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgrpo.config import GRPOConfig
from fastgrpo.rollout.base import Generation, SamplingParams
from fastgrpo.rollout.vllm_client import (
    ServerError,
    ServerProtocolError,
    ServerRequestError,
    VLLMServerGenerator,
    WeightSyncError,
    server_url,
)
from loopback_vllm import FAST_GENERATE, GENERATE, Faults, LoopbackVLLM, fake_completion, generate_response

FAST = dict(max_retries=2, backoff=0.01, request_timeout=2.0, control_timeout=2.0, weight_timeout=5.0)


def config(url: str | None = None, **kw) -> GRPOConfig:
    kw.setdefault("vllm_server_timeout", 5.0)
    return GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url=url, **kw)


@pytest.fixture
def server():
    with LoopbackVLLM() as s:
        yield s


def client(server, cfg_kw=None, **kw) -> VLLMServerGenerator:
    return VLLMServerGenerator(config(server.url, **(cfg_kw or {})), **{**FAST, **kw})


# -- readiness and configuration ----------------------------------------------------------------------------------
def test_url_from_host_and_port():
    assert server_url(config(None, vllm_server_host="0.0.0.0", vllm_server_port=9001)) == "http://127.0.0.1:9001"
    assert server_url(config(None, vllm_server_host="::", vllm_server_port=9001)) == "http://[::1]:9001"
    assert server_url(config("http://10.0.0.2:8000/")) == "http://10.0.0.2:8000"


def test_host_port_config_reaches_server(server):
    g = VLLMServerGenerator(config(None, vllm_server_host="0.0.0.0", vllm_server_port=server.port), **FAST)
    assert g.generate([[1, 2]], SamplingParams(n=2, max_tokens=3)).completion_ids


def test_waits_for_health_then_checks_models():
    with LoopbackVLLM(ready_after=0.6) as s:
        t0 = time.monotonic()
        client(s)
        assert time.monotonic() - t0 >= 0.5
        assert [c.path for c in s.calls].count("/health") >= 2
        assert [c.path for c in s.calls][-3:] == ["/v1/models", "/server_info", FAST_GENERATE]


def test_server_config_checked_at_start(server, caplog):
    server.vllm_config["model_config"]["logprobs_mode"] = "raw_logprobs"
    client(server)
    assert "processed_logprobs" in caplog.text
    server.vllm_config["weight_transfer_config"] = None
    with pytest.raises(ServerRequestError, match="no NCCL weight transfer"):
        client(server)
    server.faults = Faults(raw=(404, b'{"detail": "Not Found"}'), paths=("/server_info",))
    with pytest.raises(ServerRequestError, match="VLLM_SERVER_DEV_MODE"):
        client(server)


def test_waits_through_connection_refused():
    with socket.socket() as sock:  # a port with nothing behind it yet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    holder = {}

    def start_later():
        time.sleep(0.5)
        holder["s"] = LoopbackVLLM(port).__enter__()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        g = VLLMServerGenerator(config(f"http://127.0.0.1:{port}"), **FAST)
        assert len(g.generate([[3]], SamplingParams(n=2, max_tokens=2)).finish_reasons) == 2
    finally:
        if "s" in holder:
            holder["s"].__exit__(None, None, None)


def test_not_ready_raises_in_time():
    with LoopbackVLLM(ready_after=1e9) as s:
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="not ready after 0.5 s"):
            client(s, cfg_kw={"vllm_server_timeout": 0.5})
        assert time.monotonic() - t0 < 3


# -- generation ---------------------------------------------------------------------------------------------------
def test_generation_shape_order_and_request(server):
    prompts, n = [[1, 2, 3], [4, 5], [6]], 3
    out = client(server).generate(prompts, SamplingParams(n=n, max_tokens=5, seed=7, top_k=4, regex="[0-9]+"))
    assert isinstance(out, Generation) and len(out.completion_ids) == len(prompts) * n
    for p, prompt in enumerate(prompts):
        for j in range(n):  # prompt-major: index p * n + j, seeds seed + p*n + j
            toks, lps, fin = fake_completion(prompt, 7 + p * n + j, j, 5)
            assert out.completion_ids[p * n + j] == toks
            assert out.logprobs[p * n + j] == pytest.approx(lps)
            assert out.finish_reasons[p * n + j] == fin
    bodies = [c.body for c in server.calls if c.path == GENERATE]
    sp = sorted(bodies, key=lambda b: b["sampling_params"]["seed"])[1]["sampling_params"]
    assert sp["n"] == 3 and sp["max_tokens"] == 5 and sp["logprobs"] == 0 and sp["seed"] == 10 and sp["top_k"] == 4
    assert sp["structured_outputs"] == {"regex": "[0-9]+"} and sp["detokenize"] is False
    assert sp["output_kind"] == 2  # FINAL_ONLY: all n samples in the one response
    assert sorted(b["token_ids"] for b in bodies) == sorted(prompts)


def test_fast_route_used_when_the_server_has_it():
    """A `fastgrpo vllm-serve` server answers GET /fastgrpo/v1/generate: generation goes there, with the same body,
    and gives the same samples as vLLM's route; a server without it (404) keeps vLLM's route."""
    prompts, sp = [[1, 2, 3], [4, 5]], SamplingParams(n=3, max_tokens=6, seed=11)
    outs = {}
    for fast in (True, False):
        with LoopbackVLLM(fast=fast) as s:
            c = client(s)
            assert c.generate_path == (FAST_GENERATE if fast else GENERATE)
            outs[fast] = c.generate(prompts, sp)
            posted = [x for x in s.calls if x.method == "POST"]
            assert {x.path for x in posted} == {FAST_GENERATE if fast else GENERATE}
            assert sorted(x.body["sampling_params"]["seed"] for x in posted) == [11, 14]
    assert outs[True].completion_ids == outs[False].completion_ids
    assert outs[True].logprobs == outs[False].logprobs and outs[True].finish_reasons == outs[False].finish_reasons


def test_fast_route_answers_are_validated():
    with LoopbackVLLM(fast=True) as s:
        c = client(s)
        s.faults = Faults(raw=(200, json.dumps({"choices": [{"index": 0, "token_ids": [1, 2], "finish_reason": "stop",
                                                              "logprobs": [-0.5]}]}).encode()), paths=(FAST_GENERATE,))
        with pytest.raises(ServerProtocolError, match="one number per token"):
            c.generate([[1]], SamplingParams(n=1, max_tokens=4))
        s.faults = Faults(raw=(200, json.dumps({"choices": [{"index": 0, "token_ids": [1], "finish_reason": "stop",
                                                              "logprobs": ["x"]}]}).encode()), paths=(FAST_GENERATE,))
        with pytest.raises(ServerProtocolError, match="not a finite number"):
            c.generate([[1]], SamplingParams(n=1, max_tokens=4))


def test_large_batch_is_concurrent_and_ordered(server):
    server.faults = Faults(delay=0.1, paths=(GENERATE,))
    prompts = [[i + 1, i + 2] for i in range(40)]
    t0 = time.monotonic()
    out = client(server).generate(prompts, SamplingParams(n=2, max_tokens=4, seed=0))
    assert time.monotonic() - t0 < 40 * 0.1 / 2
    assert out.completion_ids[2 * 17 + 1] == fake_completion(prompts[17], 0 + 17 * 2 + 1, 1, 4)[0]


def test_length_and_stop_finish_reasons(server):
    out = client(server).generate([[9, 9]], SamplingParams(n=16, max_tokens=3, seed=1))
    assert set(out.finish_reasons) == {"stop", "length"}
    assert all(len(c) == 3 for c, f in zip(out.completion_ids, out.finish_reasons) if f == "length")


def test_invalid_prompts_rejected_without_http(server):
    g = client(server)
    before = len(server.calls)
    for bad in ([[]], [[1, -2]], [[1.5]], [["a"]]):
        with pytest.raises(ValueError):
            g.generate(bad, SamplingParams(n=2, max_tokens=3))
    assert len(server.calls) == before
    assert g.generate([], SamplingParams(n=2, max_tokens=3)).completion_ids == []


def test_api_key_sent_and_checked(monkeypatch):
    with LoopbackVLLM(api_key="sekret") as s:
        g = client(s, cfg_kw={"vllm_server_api_key": "sekret"})
        g.generate([[1]], SamplingParams(n=2, max_tokens=2))
        assert {c.auth for c in s.calls if c.path != "/health"} == {"Bearer sekret"}
        monkeypatch.setenv("VLLM_API_KEY", "sekret")
        client(s)  # falls back to the environment
        monkeypatch.setenv("VLLM_API_KEY", "wrong")
        with pytest.raises(ServerRequestError, match="API key"):
            client(s)


# -- retries and malformed answers -------------------------------------------------------------------------------
def test_5xx_retried_then_succeeds(server):
    g = client(server)
    server.faults = Faults(status_5xx=2, paths=(GENERATE,))
    assert len(g.generate([[1]], SamplingParams(n=2, max_tokens=2)).completion_ids) == 2
    assert g.stats()["server_retries"] == 2


def test_drop_retried_then_succeeds(server):
    g = client(server)
    server.faults = Faults(drop=1, paths=(GENERATE,))
    assert len(g.generate([[1]], SamplingParams(n=2, max_tokens=2)).completion_ids) == 2


@pytest.mark.parametrize("fault, error, match", [
    (Faults(status_5xx=100), ServerError, "stopped answering after 3 tries.*injected failure"),
    (Faults(drop=100), ServerError, "stopped answering after 3 tries.*RemoteDisconnected"),
    (Faults(truncated=True), ServerError, "truncated answer"),
    (Faults(delay=3.0), ServerError, "did not answer .* within 2 s"),
    (Faults(malformed_json=True), ServerProtocolError, "invalid JSON"),
    (Faults(oversized=300 << 20), ServerProtocolError, "over the .*-byte cap"),
    (Faults(oversized_stream=2 << 20), ServerProtocolError, "more than 1048576 bytes"),
    (Faults(wrong_schema=True), ServerProtocolError, "'choices' must be a list"),
    (Faults(raw=(200, b"[" * 200000)), ServerProtocolError, "invalid JSON"),
    (Faults(raw=(200, b"\xff\xfe\x00garbage")), ServerProtocolError, "invalid JSON"),
    (Faults(raw=(400, b'{"error": {"message": "n must be at most 256"}}')), ServerRequestError, "n must be at most 256"),
    (Faults(raw=(404, b'{"detail": "Not Found"}')), ServerRequestError, "fastgrpo vllm-serve"),
    (Faults(raw=(302, b"")), ServerProtocolError, "unexpected HTTP 302"),
    (Faults(raw_socket=b"SSH-2.0-OpenSSH\r\n\r\n"), ServerProtocolError, "invalid HTTP answer"),
    (Faults(finish_reason="abort"), ServerError, "aborted"),
    (Faults(finish_reason="weird"), ServerProtocolError, "finish_reason 'weird'"),
])
def test_failures_give_clear_errors_quickly(server, fault, error, match):
    g = client(server, max_response_bytes=1 << 20 if fault.oversized_stream else 256 << 20)
    fault.paths = (GENERATE,)
    server.faults = fault
    t0 = time.monotonic()
    with pytest.raises(error, match=match) as info:
        g.generate([[1, 2], [3]], SamplingParams(n=2, max_tokens=3))
    assert time.monotonic() - t0 < 5
    if type(info.value) is ServerError and "abort" not in match:  # transport failures point at the checkpoint
        assert "checkpoint is in fastgrpo-output" in str(info.value) and "resume_from_checkpoint" in str(info.value)


# -- weight sync --------------------------------------------------------------------------------------------------
class FakeSender:
    """Stands in for the NCCL broadcast only; records what would have been broadcast."""

    def __init__(self, fail: bool = False) -> None:
        self.init_infos, self.sent, self.fail = [], [], fail

    def open(self, init_info):
        self.init_infos.append(dict(init_info))

    def send(self, pairs, buffer_bytes, num_buffers):
        if self.fail:
            raise RuntimeError("NCCL error: unhandled system error")
        self.sent.append([(n, t.clone()) for n, t in pairs])


def fake_weights(seen):
    def iter_weights(model, only_changed, complete_parents=False):
        assert complete_parents  # a server's layerwise reload needs whole fused layers
        seen.append(only_changed)
        for name, p in model.named_parameters():
            yield name, p.detach()
    return iter_weights


SYNC = ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache", "/resume"]


def test_weight_update_call_order_and_metadata(server):
    sender, seen = FakeSender(), []
    g = client(server, weight_sender=sender, iter_weights=fake_weights(seen))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False)).to(torch.bfloat16)
    start = len(server.calls)
    g.update_weights(model)
    g.update_weights(model)
    paths = [c.path for c in server.calls[start:]]
    assert paths == ["/get_world_size", "/init_weight_transfer_engine"] + SYNC + SYNC
    init = next(c.body["init_info"] for c in server.calls if c.path == "/init_weight_transfer_engine")
    assert init == {"master_address": "127.0.0.1", "master_port": 51216, "rank_offset": 1, "world_size": 3}
    assert sender.init_infos == [init]
    info = next(c.body["update_info"] for c in server.calls if c.path == "/update_weights")
    names = [n for n, _ in model.named_parameters()]
    assert info["names"] == names and info["dtype_names"] == ["bfloat16"] * 3
    assert info["shapes"] == [[4, 3], [4], [2, 4]] and info["packed"] is True
    assert [n for n, _ in sender.sent[0]] == names and torch.equal(sender.sent[0][0][1], model[0].weight)
    assert next(c.query for c in server.calls if c.path == "/pause") == {"mode": "wait"}
    assert server.paused is None and seen == [False, False]
    assert g.stats()["weight_sync_time"] > 0 and g.stats()["weight_sync_tensors"] == 3


def test_dtype_mismatch_warned_once(server, caplog):
    g = client(server, weight_sender=FakeSender(), iter_weights=fake_weights([]))
    g.update_weights(torch.nn.Linear(2, 2))  # float32 weights, bfloat16 server
    g.update_weights(torch.nn.Linear(2, 2))
    assert caplog.text.count("precision gap") == 1


def test_weight_update_chunks_and_async_mode(server):
    sender = FakeSender()
    g = client(server, cfg_kw={"async_generation": True}, weight_sender=sender, iter_weights=fake_weights([]),
               chunk_bytes=100)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])  # 256 + 32 bytes per layer
    g.update_weights(model)
    infos = [c.body["update_info"] for c in server.calls if c.path == "/update_weights"]
    assert len(infos) == len(sender.sent) == 4  # [w0] [b0 w1] [b1 w2] [b2]: a chunk closes once >= 100 bytes
    assert [i["names"] for i in infos] == [[n for n, _ in chunk] for chunk in sender.sent]
    assert [n for i in infos for n in i["names"]] == [n for n, _ in model.named_parameters()]
    assert [c.query for c in server.calls if c.path == "/pause"] == [{"mode": "keep"}]
    assert [c.query for c in server.calls if c.path == "/reset_prefix_cache"] == [{"reset_running_requests": "true"}]


def test_lora_sends_only_changed(server):
    seen = []
    model = torch.nn.Linear(2, 2)
    model.peft_config = {"default": object()}
    client(server, weight_sender=FakeSender(), iter_weights=fake_weights(seen)).update_weights(model)
    assert seen == [True]


def test_failed_update_leaves_server_paused(server):
    g = client(server, weight_sender=FakeSender(), iter_weights=fake_weights([]))
    server.faults = Faults(status_5xx=100, paths=("/update_weights",))
    with pytest.raises(WeightSyncError, match="left paused"):
        g.update_weights(torch.nn.Linear(2, 2))
    paths = server.paths()
    assert paths.count("/update_weights") == 1  # never retried: a broadcast was in flight
    assert "/resume" not in paths and paths[-1] == "/finish_weight_update" and server.paused == "wait"


def test_failed_broadcast_is_reported(server):
    g = client(server, weight_sender=FakeSender(fail=True), iter_weights=fake_weights([]))
    with pytest.raises(WeightSyncError, match="NCCL error"):
        g.update_weights(torch.nn.Linear(2, 2))


def test_failed_rendezvous_is_reported(server):
    g = client(server, weight_sender=FakeSender(), iter_weights=fake_weights([]))
    server.faults = Faults(raw=(404, b'{"detail": "Not Found"}'), paths=("/init_weight_transfer_engine",))
    with pytest.raises(WeightSyncError, match="NCCL weight-transfer group.*fastgrpo vllm-serve"):
        g.update_weights(torch.nn.Linear(2, 2))
    assert "/pause" not in server.paths()


_CALLS = []


def _second_sync_fails(model, only_changed, complete_parents=False):
    _CALLS.append(1)
    if len(_CALLS) == 2:
        raise RuntimeError("merge failed")
    yield from fake_weights([])(model, only_changed, complete_parents)


def _rank_main(rank, url, port, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = VLLMServerGenerator(config(url), **FAST, weight_sender=FakeSender(), iter_weights=_second_sync_fails,
                            rank=rank, world_size=2)
    outcome = []
    for _ in range(2):
        try:
            g.update_weights(torch.nn.Linear(2, 2))
            outcome.append("ok")
        except WeightSyncError as e:
            outcome.append(str(e))
    results.put((rank, outcome))
    dist.destroy_process_group()


def test_two_ranks_rank0_sends_and_failures_reach_all_ranks(server):
    import multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")  # the parent has torch imported already: seconds faster than spawn
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, server.url, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    assert out[0][0] == out[1][0] == "ok"
    assert "merge failed" in out[0][1] and "rank 0 failed" in out[1][1] and "merge failed" in out[1][1]
    assert server.paths().count("/init_weight_transfer_engine") == 1 and server.paths().count("/pause") == 2


def test_real_iter_sync_weights_if_available(server):
    pytest.importorskip("fastgrpo.rollout.weights")
    sender = FakeSender()
    model = torch.nn.Linear(3, 2)
    client(server, weight_sender=sender).update_weights(model)
    assert sender.sent and all(isinstance(t, torch.Tensor) for chunk in sender.sent for _, t in chunk)


# -- sleep, close -------------------------------------------------------------------------------------------------
def test_sleep_wake(server):
    g = client(server)
    g.sleep(), g.wake()
    assert server.paths() == ["/v1/models", "/server_info", FAST_GENERATE]  # no-ops unless configured
    g = client(server, cfg_kw={"vllm_enable_sleep_mode": True}, weight_sender=FakeSender(), iter_weights=fake_weights([]))
    g.sleep()
    g.update_weights(torch.nn.Linear(2, 2))  # wakes first
    assert [(c.path, c.query) for c in server.calls if c.path in ("/sleep", "/wake_up")] == [
        ("/sleep", {"level": "1", "mode": "wait"}), ("/wake_up", {})]


def test_close(server):
    g = client(server)
    g.generate([[1], [2]], SamplingParams(n=2, max_tokens=2))
    g.close()
    with pytest.raises(RuntimeError, match="close"):
        g.generate([[1]], SamplingParams(n=2, max_tokens=2))


# -- fuzz ---------------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


@st.composite
def answers(draw):
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "socket"]))
    status = draw(st.sampled_from([200, 200, 200, 201, 204, 400, 422, 500, 503]))
    if kind == "socket":
        return Faults(raw_socket=draw(st.binary(max_size=200)))
    if kind == "bytes":
        return Faults(raw=(status, draw(st.binary(max_size=300))))
    if kind == "json":
        return Faults(raw=(status, json.dumps(draw(json_values)).encode()))
    resp = generate_response([1, 2, 3], {"n": 2, "max_tokens": 4, "seed": 0})
    path = draw(st.sampled_from(list(_leaves(resp))))
    if not path:
        resp = draw(json_values)
    else:
        target = resp
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = draw(json_values)
    return Faults(raw=(status, json.dumps(resp).encode()))


@settings(max_examples=50, deadline=4000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fault=answers())
def test_fuzz_answers_end_cleanly(server, fault):
    g = client(server, max_retries=1, backoff=0.001)
    fault.paths = (GENERATE,)
    server.faults = fault
    t0 = time.monotonic()
    try:
        out = g.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=4))
    except ServerError:
        pass
    else:
        assert len(out.completion_ids) == len(out.logprobs) == 2 and set(out.finish_reasons) <= {"stop", "length"}
        assert all(len(c) == len(lp) <= 4 for c, lp in zip(out.completion_ids, out.logprobs))
    assert time.monotonic() - t0 < 3
