"""Faster layers (fastgrpo.kernels): how use_liger_kernel / torch_compile resolve, Liger's module patch confined to
the model it was given, compiled decoder layers training as the plain ones do (CPU, torch's aot_eager backend, so
the same arithmetic), and on a GPU: Liger's kernels and inductor-compiled layers give the plain model's
log-probabilities and gradients within bf16 rounding, and a default GPU run trains with Liger's kernels."""

from __future__ import annotations

import math
import types

import pytest
import torch
from peft import LoraConfig

from conftest import content_reward
from fastgrpo import GRPOTrainer, kernels
from fastgrpo.config import ConfigError
from fastgrpo.logprobs import Rows, completion_logprobs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_use_liger_kernel_and_torch_compile_resolve_per_device_and_setting(tiny_config):
    assert not kernels.liger_wanted(tiny_config(), CPU, False)                      # default: CUDA only
    assert not kernels.liger_wanted(tiny_config(use_liger_kernel=False), CUDA, False)
    with pytest.warns(UserWarning, match="no effect on cpu"):
        assert not kernels.liger_wanted(tiny_config(use_liger_kernel=True), CPU, False)
    with pytest.warns(UserWarning, match="torch.compile"):
        assert not kernels.liger_wanted(tiny_config(use_liger_kernel=True, torch_compile=True), CUDA, False)
    # transformers' rule: a compile backend or mode turns torch_compile on, and compiled layers replace Liger
    assert tiny_config(torch_compile_mode="max-autotune").compiles and not tiny_config().compiles
    assert not kernels.liger_wanted(tiny_config(torch_compile_backend="inductor"), CUDA, False)
    if kernels._liger() is None:
        assert not kernels.liger_wanted(tiny_config(), CUDA, False)
        with pytest.raises(ConfigError, match="use_liger_kernel=True.*pip install liger-kernel"):
            kernels.liger_wanted(tiny_config(use_liger_kernel=True), CUDA, False)
    else:
        assert kernels.liger_wanted(tiny_config(), CUDA, False)
        assert not kernels.liger_wanted(tiny_config(), CUDA, True)                 # FSDP2: only when asked
        assert kernels.liger_wanted(tiny_config(use_liger_kernel=True), CUDA, True)


def test_compile_mode_and_backend_are_checked_with_the_config(tiny_config):
    with pytest.raises(ConfigError, match=r"torch_compile_mode='max_autotune'.*Did you mean 'max-autotune'"):
        tiny_config(torch_compile_mode="max_autotune")
    with pytest.raises(ConfigError, match=r"torch_compile_backend='inductr' is not a torch.compile backend.*inductor"):
        tiny_config(torch_compile_backend="inductr")


def test_liger_kernel_config_is_checked_with_the_config(tiny_config):
    assert tiny_config().liger_kernel_config is None
    assert tiny_config(liger_kernel_config={"rope": False}).liger_kernel_config == {"rope": False}
    assert tiny_config(liger_kernel_config='{"swiglu": false, "rms_norm": true}').liger_kernel_config == \
        {"swiglu": False, "rms_norm": True}                                    # JSON text, as from a command line
    assert tiny_config(liger_kernel_config="").liger_kernel_config is None
    with pytest.raises(ConfigError, match=r"'rms_nrom' is not one of Liger's switches.*Did you mean 'rms_norm'\?"):
        tiny_config(liger_kernel_config={"rms_nrom": False})
    with pytest.raises(ConfigError, match=r"liger_kernel_config\['rope'\] must be true or false, got 'no'"):
        tiny_config(liger_kernel_config={"rope": "no"})
    with pytest.raises(ConfigError, match="liger_kernel_config=.*is not JSON"):
        tiny_config(liger_kernel_config="{rope: false}")
    with pytest.raises(ConfigError, match="liger_kernel_config must be a mapping"):
        tiny_config(liger_kernel_config='["rope"]')
    with pytest.raises(ConfigError, match="liger_kernel_config must be"):
        tiny_config(liger_kernel_config=["rope"])


def test_liger_kernel_config_selects_the_kernels_passed_to_ligers_patch():
    qwen2 = ("model", "rope", "cross_entropy", "fused_linear_cross_entropy", "rms_norm", "swiglu")  # its signature
    assert kernels.liger_kwargs(None, "silu", qwen2) == dict(rope=True, rms_norm=True, swiglu=True,
                                                             cross_entropy=False, fused_linear_cross_entropy=False)
    got = kernels.liger_kwargs({"rope": False, "fused_linear_cross_entropy": True}, "silu", qwen2)
    assert got == dict(rope=False, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    assert kernels.liger_kwargs({"swiglu": True}, "gelu", qwen2)["swiglu"] is False  # Liger's MLP is SiLU-gated
    gemma = ("model", "rope", "cross_entropy", "fused_linear_cross_entropy", "rms_norm", "geglu")
    assert kernels.liger_kwargs(None, "gelu_pytorch_tanh", gemma) == dict(
        rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False)  # geglu: Liger's default
    assert kernels.liger_kwargs({"geglu": False}, "gelu_pytorch_tanh", gemma)["geglu"] is False


def test_a_module_patch_is_confined_to_the_model_it_was_given():
    """Liger's patch functions swap classes and functions in the modeling module; `confine` puts the classes back
    and keeps a swapped function for CUDA tensors only, so models built later (on CPU too) run as before."""
    mod = types.ModuleType("fake_modeling")

    class Norm(torch.nn.Module):
        pass

    def rope(q, k):
        return "plain"

    mod.Norm, mod.rope, mod.EPS = Norm, rope, 1e-6
    before = dict(vars(mod))
    mod.Norm, mod.rope = type("FastNorm", (Norm,), {}), lambda q, k: "fast"
    kernels.confine(mod, before)
    assert mod.Norm is Norm and mod.EPS == 1e-6
    x = torch.zeros(2)
    assert mod.rope(x, x) == "plain" and mod.rope(q=x, k=x) == "plain"
    if torch.cuda.is_available():
        assert mod.rope(x.cuda(), x.cuda()) == "fast"


def test_decoder_layers_are_found_through_a_peft_wrapper(tiny_model_factory):
    from peft import get_peft_model

    model = get_peft_model(tiny_model_factory(layers=3), LoraConfig(r=2, target_modules=["q_proj"]))
    layers = kernels.decoder_layers(model)
    assert layers is model.get_base_model().model.layers and len(layers) == 3


def test_compiled_layers_run_eagerly_inside_eager_layers_and_compiled_again_after(tiny_model_factory):
    model = tiny_model_factory()
    assert kernels.compile_layers(model, "eager", None) == 2
    layers = kernels.decoder_layers(model)
    compiled = [layer._compiled_call_impl for layer in layers]
    assert all(c is not None for c in compiled)
    with kernels.eager_layers(model):
        assert all(layer._compiled_call_impl is None for layer in layers)
        model(torch.tensor([[1, 2, 3]]))
    assert [layer._compiled_call_impl for layer in layers] == compiled


def _train(tiny_model_factory, char_tokenizer, dataset, config):
    trainer = GRPOTrainer(tiny_model_factory(), content_reward, args=config, train_dataset=dataset,
                          processing_class=char_tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out = trainer.train()
    return trainer, before, out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient-checkpointing"])
def test_compiled_layers_train_as_the_plain_ones(checkpointing, tiny_model_factory, char_tokenizer,
                                                 conversational_dataset, tiny_config, tmp_path, capsys):
    """torch_compile_backend alone turns compilation on; with aot_eager (autograd traced, no code generation) the
    arithmetic is the plain model's, so losses and trained weights agree; LoRA moved, base weights did not, and
    generation (which runs the layers eagerly) worked in between."""
    runs = {}
    torch._dynamo.utils.counters.clear()
    for name, extra in (("plain", {}), ("compiled", {"torch_compile_backend": "aot_eager"})):
        runs[name] = _train(tiny_model_factory, char_tokenizer, conversational_dataset,
                            tiny_config(max_steps=2, output_dir=str(tmp_path / name),
                                        gradient_checkpointing=checkpointing, **extra))
    (plain, _, out0), (comp, before, out1) = runs["plain"], runs["compiled"]
    assert "torch_compile: the 2 decoder layers compile during the first training pass" in capsys.readouterr().err
    assert plain.speedups == [] and comp.speedups == ["torch_compile (2 layers)"]
    assert all(layer._compiled_call_impl is not None for layer in kernels.decoder_layers(comp.model))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers were traced, not skipped
    assert out1.training_loss == pytest.approx(out0.training_loss, abs=1e-5)
    after = dict(comp.model.named_parameters())
    for n, p in plain.model.named_parameters():
        torch.testing.assert_close(after[n].detach(), p.detach(), rtol=1e-4, atol=1e-5)
        moved = not torch.equal(before[n], after[n].detach())
        assert moved == ("lora_" in n), n


# ------------------------------------------------------------------------------------------------------ GPU
def _gpu_pair(char_tokenizer, seed: int = 0):
    """Two identical bf16 LoRA(q, v) Qwen2 models on CUDA, adapters non-zero, and a ragged batch of rows."""
    from fastgrpo.testing import build_tiny_qwen2
    from peft import get_peft_model

    models = []
    for _ in range(2):
        base = build_tiny_qwen2(char_tokenizer, num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4,
                                num_kv_heads=2, seed=seed)
        torch.manual_seed(seed)
        m = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        models.append(m.to(device="cuda", dtype=torch.bfloat16).train())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (7, 30, 12)]
    completions = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (40, 9, 25)]
    return models, Rows.build(prompts, completions, char_tokenizer.pad_token_id, CUDA)


def _logprobs_and_grads(model, rows):
    lp, ent = completion_logprobs(model, rows, 0.7, 64, want_entropy=True)
    coeff = torch.linspace(-1.0, 1.0, lp.numel(), device=lp.device)
    (lp * coeff).sum().backward()
    return lp.detach().float(), ent.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                       if p.requires_grad}


def _assert_close_in_bf16(fast, plain):
    (lp, ent, grads), (lp0, ent0, grads0) = fast, plain
    torch.testing.assert_close(lp, lp0, rtol=0, atol=3e-2)
    torch.testing.assert_close(ent, ent0, rtol=0, atol=3e-2)
    assert grads.keys() == grads0.keys() and grads
    for n in grads:
        err = (grads[n] - grads0[n]).norm() / grads0[n].norm().clamp_min(1e-12)
        assert err < 3e-2, (n, float(err))


@pytest.mark.gpu
def test_liger_layers_give_the_plain_models_logprobs_and_gradients_on_gpu(char_tokenizer):
    from transformers.models.qwen2 import modeling_qwen2

    norm_class, mlp_class = modeling_qwen2.Qwen2RMSNorm, modeling_qwen2.Qwen2MLP
    (fast, plain), rows = _gpu_pair(char_tokenizer)
    assert kernels.apply_liger(fast)
    layer = fast.get_base_model().model.layers[0]
    assert all("forward" in vars(m) for m in (layer.input_layernorm, layer.mlp))  # patched on the instance
    _assert_close_in_bf16(_logprobs_and_grads(fast, rows), _logprobs_and_grads(plain, rows))
    # the patch reached this model only: the module's classes are back, and a CPU model built now still runs
    assert modeling_qwen2.Qwen2RMSNorm is norm_class and modeling_qwen2.Qwen2MLP is mlp_class
    from fastgrpo.testing import build_tiny_qwen2

    cpu_model = build_tiny_qwen2(char_tokenizer)
    assert torch.isfinite(cpu_model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.gpu
def test_inductor_compiled_layers_give_the_plain_models_logprobs_and_gradients_on_gpu(char_tokenizer):
    (fast, plain), rows = _gpu_pair(char_tokenizer)
    assert kernels.compile_layers(fast, None, None) == 2
    _assert_close_in_bf16(_logprobs_and_grads(fast, rows), _logprobs_and_grads(plain, rows))


@pytest.mark.gpu
def test_a_default_gpu_run_trains_with_liger_kernels(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                     tiny_config):
    trainer, before, out = _train(tiny_model_factory, char_tokenizer, conversational_dataset,
                                  tiny_config(max_steps=2, use_vllm=False))
    assert trainer.device.type == "cuda" and trainer.speedups == ["liger"]
    assert math.isfinite(out.training_loss)
    for n, p in trainer.model.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == ("lora_" in n), n
