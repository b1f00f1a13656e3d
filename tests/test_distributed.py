"""Data parallelism over torchrun on CPU (gloo): ranks stay in lockstep, each prompt's group lives on one rank,
and two torchrun "nodes" on one host over loopback behave like one node with two processes."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "dist_script.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _results(*dirs: Path) -> list[dict]:
    res = [json.loads(f.read_text()) for d in dirs for f in sorted(d.glob("result-*.json"))]
    return sorted(res, key=lambda r: r["rank"])


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_two_ranks_stay_in_lockstep_with_whole_groups(tmp_path, scale):
    cmd = _torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port()),
                    str(SCRIPT), str(tmp_path / "out"), scale)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = _results(tmp_path / "out")
    assert r0["lora_abs"] > 0                                   # it trained
    assert r0["lora_sum"] == r1["lora_sum"] and r0["lora_abs"] == r1["lora_abs"]   # gradients were averaged
    # every prompt a rank scored came num_generations (4) times, all on that rank: groups never straddle ranks
    for r in (r0, r1):
        assert set(Counter(r["prompts"]).values()) == {4}
    assert not set(r0["prompts"]) & set(r1["prompts"])          # ranks trained on different prompts


def test_two_nodes_over_loopback(tmp_path):
    port = str(_port())
    procs = [subprocess.Popen(_torchrun("--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                                        "--master_addr", "127.0.0.1", "--master_port", port,
                                        str(SCRIPT), str(tmp_path / f"out{n}")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for n in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = _results(tmp_path / "out0", tmp_path / "out1")
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["lora_sum"] == r1["lora_sum"] and r0["lora_abs"] > 0
