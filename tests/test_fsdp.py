"""FSDP2 for full fine-tuning under torchrun, on CPU over gloo: it must not change the math (same losses and
weights as replicated ranks), and checkpoints gathered from shards must resume a run exactly."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.batch import split_passes
from fastgrpo.config import ConfigError, GRPOConfig
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2
from test_distributed import HERE, _env, _port, _results, _torchrun

SCRIPT = HERE / "fsdp_script.py"


def _launch(out, fsdp: str, resume=None) -> list[dict]:
    cmd = _torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port()),
                    str(SCRIPT), str(out), fsdp, *([str(resume)] if resume else []))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return _results(out)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    return out, _launch(out, "")  # "": auto, which shards a fully fine-tuned model over 2 ranks


def test_fsdp2_trains_like_replicated_ranks(fsdp_run, tmp_path):
    out, (f0, f1) = fsdp_run
    assert f0["fsdp"] and f0["sharded"] and f0["tied"] and f1["sharded"]  # FSDP2, lm_head still tied
    (r0, r1) = _launch(tmp_path / "rep", "no_shard")
    assert not r0["fsdp"] and not r0["sharded"]
    assert f0["steps"] == r0["steps"] == [1, 2, 3, 4]
    assert f0["loss"] == pytest.approx(r0["loss"], rel=1e-5, abs=1e-6)
    assert f0["grad_norm"] == pytest.approx(r0["grad_norm"], rel=1e-5)  # global norm of DTensor gradients
    assert f0["loss"] == f1["loss"]                                     # ranks log the reduced values
    fsdp_w, rep_w = load_file(out / "final" / "model.safetensors"), load_file(tmp_path / "rep" / "final" / "model.safetensors")
    assert fsdp_w.keys() == rep_w.keys()
    initial = build_tiny_qwen2(build_char_tokenizer()).state_dict()
    for k in fsdp_w:
        torch.testing.assert_close(fsdp_w[k], rep_w[k], rtol=1e-5, atol=1e-6, msg=k)
    changed = [k for k in fsdp_w if not torch.equal(fsdp_w[k], initial[k])]
    assert len(changed) == len(fsdp_w)                                   # every tensor trained, embeddings included

    from transformers import AutoModelForCausalLM                      # save_model wrote a normal HF folder

    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.layers[1].mlp.down_proj.weight, fsdp_w["model.layers.1.mlp.down_proj.weight"])


def test_fsdp2_checkpoint_resumes_exactly(fsdp_run, tmp_path):
    out, (f0, _) = fsdp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")       # as if the run had died after step 2
    (s0, _) = _launch(resumed, "full_shard", resumed / "checkpoint-2")
    assert s0["steps"] == [1, 2, 3, 4] and s0["loss"] == f0["loss"]     # steps 1-2 from the checkpoint's history
    want, got = load_file(out / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    blob = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert len(blob["rng_ranks"]) == 2                                  # each rank's sampler resumes where it was


@pytest.mark.parametrize("value", ["shard_grad_op", ["full_shard", "offload"], "no_shard full_shard", 1])
def test_bad_fsdp_value_names_the_field(value):
    with pytest.raises(ConfigError, match=r"^fsdp"):
        GRPOConfig(fsdp=value)


@pytest.mark.parametrize("value", ["", "full_shard", "full_shard auto_wrap", ["full_shard", "auto_wrap"], "no_shard"])
def test_fsdp_values_accepted_as_transformers_spells_them(value):
    GRPOConfig(fsdp=value)


def test_split_passes_evens_out_pass_counts():
    assert split_passes([[0, 1, 2, 3], [4]], 4) == [[0], [1], [2, 3], [4]]
    assert split_passes([[0, 1]], 1) == [[0, 1]]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux /proc")
def test_exit_waits_for_busy_collective_threads():
    """_shutdown's wait (see distributed._settle_gloo_workers) reads thread states by name: a busy thread of that
    name holds it back until the thread sleeps."""
    import ctypes
    import threading
    import time

    from fastgrpo.distributed import _settle_gloo_workers, _thread_states

    stop, named = threading.Event(), threading.Event()

    def spin():
        ctypes.CDLL(None).prctl(15, b"pt_gloo_runloop")  # PR_SET_NAME: the OS name gloo gives its worker threads
        named.set()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # pure Python, GIL released every few ms
            pass
        stop.wait()

    t = threading.Thread(target=spin)
    t.start()
    named.wait()
    try:
        tasks = Path("/proc/self/task")
        s = time.monotonic()
        _settle_gloo_workers(timeout=2.0)
        waited = time.monotonic() - s
        assert 0.2 < waited < 1.5, waited             # held back while the thread spun, released once it slept
        assert _thread_states(tasks, "pt_gloo_runloop") == ["S"]
    finally:
        stop.set()
        t.join()
