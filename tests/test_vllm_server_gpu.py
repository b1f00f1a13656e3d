"""`fastgrpo vllm-serve` on a GPU (vLLM 0.26): its compact generate route (fastgrpo.serve.FastGenerate) against
vLLM's own /inference/v1/generate, through the trainer's client, on a tiny model the test builds.

    VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=src pytest -q -m gpu tests/test_vllm_server_gpu.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from fastgrpo.config import GRPOConfig
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_client import FAST_GENERATE_PATH, GENERATE_PATH, VLLMServerGenerator

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    from fastgrpo.testing import save_tiny_model

    path = str(tmp_path_factory.mktemp("tiny-qwen2"))
    save_tiny_model(path, "char", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                    dtype=torch.float32, seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
               VLLM_USE_FLASHINFER_SAMPLER="0")
    log = open(os.path.join(path, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "fastgrpo.cli", "vllm-serve", "--model", path, "--port", str(port),
                             "--gpu-memory-utilization", "0.2", "--max-model-len", "256", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        if proc.poll() is not None or time.monotonic() >= deadline:
            log.flush()
            pytest.fail("the server did not start:\n" + open(log.name).read()[-3000:])
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client(port: int) -> VLLMServerGenerator:
    cfg = GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url=f"http://127.0.0.1:{port}",
                     vllm_server_timeout=60)
    return VLLMServerGenerator(cfg)


@pytest.mark.gpu
def test_fast_route_equals_vllm_route(server):
    client = _client(server)
    assert client.generate_path == FAST_GENERATE_PATH  # found by the probe
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    outs = {}
    for path in (FAST_GENERATE_PATH, GENERATE_PATH, FAST_GENERATE_PATH):
        client.generate_path = path
        greedy = client.generate(prompts, SamplingParams(n=1, max_tokens=40, temperature=0.0))  # vLLM: greedy is n=1
        sampled = client.generate(prompts, SamplingParams(n=3, max_tokens=40, seed=3, extra={"ignore_eos": True}))
        outs.setdefault(path, []).append((greedy, sampled))
    (fast, fast_again), (slow,) = outs[FAST_GENERATE_PATH], outs[GENERATE_PATH]
    for a, b in ((fast, slow), (fast, fast_again)):
        for x, y in zip(a, b):
            assert x.completion_ids == y.completion_ids and x.finish_reasons == y.finish_reasons
            for lx, ly in zip(x.logprobs, y.logprobs):
                assert lx == pytest.approx(ly, abs=1e-4)
    greedy, sampled = fast
    assert all(len(c) == 40 for c in sampled.completion_ids)  # ignore_eos passed through to vLLM
    assert all(all(v <= 0 for v in lp) for lp in sampled.logprobs) and any(v < -1e-3 for v in sampled.logprobs[0])
    client.close()


@pytest.mark.gpu
def test_fast_route_refuses_a_prompt_longer_than_the_context(server):
    from fastgrpo.rollout.http import ServerRequestError

    client = _client(server)
    with pytest.raises(ServerRequestError, match="400"):
        client.generate([[5] * 300], SamplingParams(n=1, max_tokens=8))
    client.close()
