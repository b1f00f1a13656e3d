"""Yield points (fastgrpo.sharing): where training waits for the GPU while generation runs beside it.

On CPU the wait is a counter; on a GPU it is the stream's synchronize (same hooks)."""

import pytest
import torch

from fastgrpo import GRPOConfig
from fastgrpo.config import ConfigError
from fastgrpo.sharing import _first_tensor, yield_points, yield_targets


def _loss(model, ids):
    return model(input_ids=ids).logits.float().square().mean()


@pytest.fixture
def model_and_ids(tiny_model_factory):
    model = tiny_model_factory(layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize("mode,per_layer", [("layer", 1), ("block", 2)])
def test_one_wait_per_target_forward_and_backward(model_and_ids, mode, per_layer):
    model, ids = model_and_ids
    targets = yield_targets(model, mode)
    assert len(targets) == 3 * per_layer
    if mode == "block":  # attention and MLP; the norms hold too few parameters
        assert {type(t).__name__ for t in targets} == {"Qwen2Attention", "Qwen2MLP"}
    waits = []
    with yield_points(model, mode, lambda: True, wait=lambda: waits.append(1)) as n:
        assert n == len(targets)
        loss = _loss(model, ids)
        assert len(waits) == len(targets)  # forward: one after each target
        loss.backward()
    assert len(waits) == 2 * len(targets)  # backward: one before each target's backward


def test_no_waits_when_inactive_or_off_and_hooks_removed_on_exit(model_and_ids):
    model, ids = model_and_ids
    waits = []
    with yield_points(model, "layer", lambda: False, wait=lambda: waits.append(1)):
        _loss(model, ids).backward()
    with yield_points(model, "off", lambda: True, wait=lambda: waits.append(1)) as n:
        assert n == 0
        _loss(model, ids).backward()
    with yield_points(model, "layer", lambda: True, wait=lambda: waits.append(1)):
        pass
    _loss(model, ids).backward()
    assert waits == []
    assert all(not layer._forward_hooks for layer in yield_targets(model, "layer"))


def test_generation_ending_mid_pass_stops_the_waits(model_and_ids):
    """The gradient hooks ask again when they run: once the generation is done, the backward runs without waits."""
    model, ids = model_and_ids
    waits, generating = [], [True]
    with yield_points(model, "layer", lambda: generating[0], wait=lambda: waits.append(1)):
        loss = _loss(model, ids)
        generating[0] = False
        loss.backward()
    assert len(waits) == 3


def test_same_loss_and_gradients_with_and_without_yield_points(model_and_ids):
    model, ids = model_and_ids
    loss0 = _loss(model, ids)
    loss0.backward()
    grads0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with yield_points(model, "block", lambda: True, wait=lambda: None):
        loss1 = _loss(model, ids)
        loss1.backward()
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads0, model.parameters()))


def test_frozen_base_with_lora_still_waits_in_backward(tiny_model_factory):
    """With LoRA the base weights are frozen; every layer's output still needs a gradient (the adapters sit in
    every layer), so the backward gets its waits too."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model_factory(layers=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(1))
    waits = []
    with yield_points(model, "layer", lambda: True, wait=lambda: waits.append(1)):
        _loss(model, ids).backward()
    assert len(waits) == 4


def test_compiled_layers_get_no_yield_points(tiny_model_factory):
    model = tiny_model_factory(layers=2)
    for layer in model.model.layers:
        layer.compile(backend="eager")
    assert yield_targets(model, "layer") == []


def test_async_yield_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="async_yield"):
        GRPOConfig(output_dir=str(tmp_path), async_yield="layers")
    assert GRPOConfig(output_dir=str(tmp_path), async_yield="block").async_yield == "block"


def test_default_yield_mode_follows_the_generator(tmp_path):
    """None: 'layer' where generation shares the GPU by time slice (vLLM's engine process), 'off' otherwise; an
    explicit setting wins; nothing without async generation or a GPU."""
    from fastgrpo.rollout.base import Generator
    from fastgrpo.sharing import async_yield_mode

    class Gen(Generator):
        def generate(self, prompt_ids, params):
            raise AssertionError

    beside, inproc, cuda = Gen(), Gen(), torch.device("cuda", 0)
    beside.shares_gpu_by_time_slice = True
    cfg = GRPOConfig(output_dir=str(tmp_path), async_generation=True)
    assert async_yield_mode(cfg, beside, cuda) == "layer" and async_yield_mode(cfg, inproc, cuda) == "off"
    assert async_yield_mode(cfg, beside, torch.device("cpu")) == "off"
    assert async_yield_mode(GRPOConfig(output_dir=str(tmp_path)), beside, cuda) == "off"
    explicit = GRPOConfig(output_dir=str(tmp_path), async_generation=True, async_yield="block")
    assert async_yield_mode(explicit, inproc, cuda) == "block"
    off = GRPOConfig(output_dir=str(tmp_path), async_generation=True, async_yield="off")
    assert async_yield_mode(off, beside, cuda) == "off"


@pytest.mark.gpu
def test_on_gpu_each_point_leaves_the_stream_idle_and_changes_nothing(tiny_model_factory):
    """With the real wait (the stream's synchronize): right after each yield point, forward and backward, the
    trainer's stream has nothing queued (what lets the GPU switch to the engine's context), and the loss and
    gradients equal those without yield points."""
    model = tiny_model_factory(layers=3, hidden=64).cuda()
    ids = torch.randint(0, model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    loss0 = _loss(model, ids)
    loss0.backward()
    grads0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    idle = []

    def probe(module, args, output):  # registered after the yield point's hook, so it runs right after it
        idle.append(torch.cuda.current_stream().query())
        _first_tensor(output).register_hook(lambda g: idle.append(torch.cuda.current_stream().query()))

    with yield_points(model, "layer", lambda: True) as n:
        handles = [layer.register_forward_hook(probe) for layer in yield_targets(model, "layer")]
        loss1 = _loss(model, ids)
        loss1.backward()
    for h in handles:
        h.remove()
    assert n == 3 and len(idle) == 6 and all(idle)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads0, model.parameters()))


@pytest.mark.gpu
def test_an_async_run_with_yield_points_trains_on_gpu(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                      tiny_config, tmp_path):
    """The loop's wiring on a GPU: async generation (transformers, in a thread) with async_yield='layer' trains
    the LoRA weights and leaves the base weights alone."""
    from peft import LoraConfig

    from conftest import content_reward
    from fastgrpo import GRPOTrainer

    config = tiny_config(max_steps=3, async_generation=True, async_yield="layer", output_dir=str(tmp_path / "run"))
    trainer = GRPOTrainer(tiny_model_factory(), content_reward, args=config, train_dataset=conversational_dataset,
                          processing_class=char_tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert trainer.state.global_step == 3 and "async_yield=layer" in trainer.speedups
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_async_yield_from_yaml_and_the_command_line(tmp_path):
    """YAML (and so the CLI's override values) reads a bare off/on as false/true; 'None' from an argument parser
    is the default."""
    from fastgrpo.cli import load_run_config

    def load(value):
        cfg, _ = load_run_config(None, ["--model", "x", "--output_dir", str(tmp_path), "--async_generation", "true",
                                        "--async_yield", value])
        return cfg.async_yield

    assert [load(v) for v in ("off", "on", "layer", "None", "block")] == ["off", "layer", "layer", None, "block"]
    path = tmp_path / "run.yaml"
    path.write_text(f"model: x\noutput_dir: {tmp_path}\nasync_generation: true\nasync_yield: off\n")
    assert load_run_config(str(path))[0].async_yield == "off"
    with pytest.raises(ConfigError, match="async_yield"):
        load("layers")
