"""Per-token log-probabilities of completions, without ever materialising [B, T, V] logits.

The backbone runs once over prompt+completion rows; only the hidden states that predict completion tokens are
kept (padding and prompt positions are dropped), and the output layer plus log-softmax run over them in chunks
of `chunk` tokens inside one autograd function that recomputes each chunk's logits in the backward pass. With
Qwen's 151,936-token vocabulary this is what keeps memory flat and avoids fp32 copies of the logits.
Logits are divided by the sampling temperature, as the generator's processed logprobs are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_logprobs
from .modeling import base_model


@dataclass(slots=True)
class Rows:
    """Sequences laid out for one forward pass: prompt_i + completion_i, contiguous, right-padded.

    input_ids:      [B, L]
    attention_mask: [B, L]
    position_ids:   [B, L]
    rows, cols:     [M] the (row, column) of the hidden state predicting each completion token
    targets:        [M] completion token ids (M = total completion tokens)
    slot:           [M] flat index row * T + t into a [B, T] completion grid
    T:              longest completion in the pass
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    slot: torch.Tensor
    T: int

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
              device: torch.device | str = "cpu") -> "Rows":
        B = len(prompts)
        L = max(len(p) + len(c) for p, c in zip(prompts, completions))
        T = max(max(len(c) for c in completions), 1)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        rows, cols, targets, slot = [], [], [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            att[i, :n] = 1
            rows.extend([i] * len(c))
            cols.extend(range(len(p) - 1, len(p) - 1 + len(c)))
            targets.extend(c)
            slot.extend(range(i * T, i * T + len(c)))
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(ids.to(device), att.to(device), pos.to(device), t(rows), t(cols), t(targets), t(slot), T)

    def to_grid(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter [M] values into a [B, T] grid (positions past a completion's end hold `fill`)."""
        grid = flat.new_full((self.input_ids.shape[0] * self.T,), fill)
        return grid.index_copy(0, self.slot, flat).view(-1, self.T)


class _ChunkedLogprob(torch.autograd.Function):
    """logp_i = log_softmax(h_i W^T / tau)[y_i], in tiles of `chunk` rows x `block` vocabulary entries; entropy
    computed alongside without grad.

    The log-sum-exp runs online over vocabulary blocks (running max and rescaled sum, as flash attention does), so a
    tile never needs the rest of its row. With one block per row (GPUs) this is the plain chunked log-softmax. On
    CPU a [512, 1024] fp32 tile (2 MB) stays in cache, where the passes over it and the matmul producing it run
    2-3x faster than over [chunk, 151936] rows spilled to memory. Passes over tiles are what cost: the forward
    takes one exp for both the log-sum-exp and the entropy, and keeps the log-sum-exp [M] so that the backward
    gets softmax(z) as exp(z - lse) in place, without another max and sum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, chunk: int, block: int, want_entropy: bool,
                fused: bool):
        n, V = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        ent = torch.empty(n, **f32) if want_entropy else None
        fused = fused and block >= V and triton_logprobs.usable(hidden.device)
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk], targets[s:s + chunk]
            if fused:  # one Triton pass over each row of the logits (triton_logprobs.py)
                lse_c, zy, ent_c = triton_logprobs.row_stats(F.linear(h, weight, bias), y, inv_temp, want_entropy)
                lse[s:s + chunk], logp[s:s + chunk] = lse_c, zy - lse_c
                if want_entropy:
                    ent[s:s + chunk] = ent_c
                continue
            top = total = zy = pz = None
            for lo in range(0, V, block):
                z = F.linear(h, weight[lo:lo + block], None if bias is None else bias[lo:lo + block])
                z = z.float() * inv_temp  # [c, b]
                zy = z.gather(1, y[:, None]).squeeze(1) if block >= V else _pick(z, y, lo, zy)
                new_top = z.amax(-1) if top is None else torch.maximum(top, z.amax(-1))
                e = (z - new_top[:, None]).exp_()  # softmax(z) * total, this block's part
                if top is None:
                    total, pz = e.sum(-1), (e.mul_(z).sum(-1) if want_entropy else None)
                else:  # rescale what earlier blocks summed to the new max
                    r = (top - new_top).exp_()
                    total = total.mul_(r).add_(e.sum(-1))
                    pz = pz.mul_(r).add_(e.mul_(z).sum(-1)) if want_entropy else None
                top = new_top
            lse[s:s + chunk] = top + total.log()
            logp[s:s + chunk] = zy - lse[s:s + chunk]
            if want_entropy:  # H = lse - sum(p z)
                ent[s:s + chunk] = lse[s:s + chunk] - pz / total
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_temp, ctx.chunk, ctx.block, ctx.fused = inv_temp, chunk, block, fused
        ctx.mark_non_differentiable(*([ent] if ent is not None else []))
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        V, block = weight.shape[0], ctx.block
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            g = grad_logp[s:s + ctx.chunk].float()
            acc = None  # d/dh summed over blocks, fp32 when there are several
            for lo in range(0, V, block):
                w = weight[lo:lo + block]
                z = F.linear(h, w, None if bias is None else bias[lo:lo + block])
                # d logp / d z = onehot(y) - softmax(z); chain through the 1/temperature scaling
                if ctx.fused:
                    gz = triton_logprobs.row_grad_(z, lse[s:s + ctx.chunk], y, g, ctx.inv_temp).to(hidden.dtype)
                else:
                    z = z.float() * ctx.inv_temp
                    gz = z.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax(z)
                    idx, inside = _local(y, lo, z.shape[1])
                    gz.scatter_add_(1, idx[:, None], torch.where(inside, g, 0.0)[:, None])
                    gz.mul_(ctx.inv_temp)
                    gz = gz.to(hidden.dtype)
                if need_h:
                    part = gz @ w
                    acc = part if acc is None else acc.float() + part
                if need_w:
                    gw[lo:lo + block] += (gz.t() @ h).float()
                if need_b:
                    gb[lo:lo + block] += gz.float().sum(0)
            if need_h:
                gh[s:s + ctx.chunk] = acc
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None, None, None, None)


def _local(y: torch.Tensor, lo: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each target inside the vocabulary block starting at `lo` (clamped), and whether it is there."""
    inside = (y >= lo) & (y < lo + width)
    return (y - lo).clamp_(0, width - 1), inside


def _pick(z: torch.Tensor, y: torch.Tensor, lo: int, acc: torch.Tensor | None) -> torch.Tensor:
    """Target logits found in this block [c, b], added to those of earlier blocks."""
    idx, inside = _local(y, lo, z.shape[1])
    got = torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), 0.0)
    return got if acc is None else acc + got


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     temperature: float = 1.0, chunk: int = 4096, want_entropy: bool = False,
                     block: int | None = None, fused: bool = True):
    """hidden [M, H], weight [V, H], targets [M] -> (logp [M] fp32, entropy [M] fp32 or None).

    `block`: vocabulary entries per tile; default the whole vocabulary on GPUs, and on CPU tiles of
    CPU_TILE (rows, vocabulary) that stay in cache. `fused`: on CUDA with Triton, the row passes run as the kernels
    of triton_logprobs.py (same math; False keeps the torch path, which the tests compare them with)."""
    if block is None:
        if hidden.device.type == "cpu":
            chunk, block = min(chunk, CPU_TILE[0]), CPU_TILE[1]
        else:
            block = weight.shape[0]
    return _ChunkedLogprob.apply(hidden, weight, bias, targets, 1.0 / temperature, chunk, block, want_entropy, fused)


#: CPU tile of the log-softmax, rows x vocabulary entries: 2 MB in fp32, the two cores' L2 (measured in docs/benchmarks.md).
CPU_TILE = (512, 1024)


def plain_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference path: full log-softmax. logits [M, V], targets [M] -> (logp [M], entropy [M])."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def causal_lm_parts(model: torch.nn.Module):
    """(backbone, output layer) of a causal LM, PEFT-wrapped or not."""
    base = base_model(model)
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return backbone, base.get_output_embeddings()


def logit_transform(model: torch.nn.Module):
    """The elementwise map a causal LM applies to its output layer's result inside forward(), from its config:
    Gemma 2/3's final_logit_softcapping (c * tanh(z / c)), Cohere's logit_scale (z * s), Granite's logits_scaling
    (z / g); None when the logits are the output layer's own (Qwen2, Llama, ...)."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap, scale = getattr(cfg, "final_logit_softcapping", None), getattr(cfg, "logit_scale", None)
    div = getattr(cfg, "logits_scaling", None)
    fns = []
    if cap:
        fns.append(lambda z: torch.tanh(z / cap) * cap)
    if isinstance(scale, (int, float)) and scale != 1:
        fns.append(lambda z: z * scale)
    if isinstance(div, (int, float)) and div not in (0, 1):
        fns.append(lambda z: z / div)
    if not fns:
        return None
    return lambda z: functools.reduce(lambda acc, f: f(acc), fns, z)


# FSDP2: name of the root-module method that runs `head_logprobs`; registered as a forward method (shard_model),
# so that the root's own parameters (embeddings, final norm, head) are gathered around it as around forward().
FSDP_METHOD = "_fastgrpo_head_logprobs"


def completion_logprobs(model: torch.nn.Module, rows: Rows, temperature: float = 1.0, chunk: int = 4096,
                        want_entropy: bool = False, plain: bool = False):
    """Log-probabilities (and entropies) of every completion token of `rows`.

    returns: (logp [M] fp32, entropy [M] fp32 or None), in the order of rows.targets
    `plain=True` runs the reference path (full logits through the model's own head) for tests.
    """
    if plain:
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                       position_ids=rows.position_ids).logits
        lp, ent = plain_logprobs(logits[rows.rows, rows.cols], rows.targets, temperature)
        return lp, (ent.detach() if want_entropy else None)
    base = base_model(model)
    through_root = getattr(base, FSDP_METHOD, None)
    if through_root is not None:
        return through_root(rows, temperature, chunk, want_entropy)
    return head_logprobs(model, rows, temperature, chunk, want_entropy)


def head_logprobs(model: torch.nn.Module, rows: Rows, temperature: float, chunk: int, want_entropy: bool):
    """completion_logprobs past the model's forward(): the backbone's hidden states, then the head in chunks."""
    backbone, head = causal_lm_parts(model)
    # Rows are right-padded and contiguous, so the causal mask alone keeps every real token away from padding:
    # no attention mask means SDPA can take its fused causal (flash) kernel. The plain path keeps the explicit
    # mask and positions, and the tests hold the two equal.
    hidden = backbone(input_ids=rows.input_ids, use_cache=False).last_hidden_state
    h = hidden[rows.rows, rows.cols]
    transform = logit_transform(model)
    if hasattr(head, "base_layer") or transform is not None:
        # A PEFT adapter on the output layer itself (e.g. LoRA with lm_head in target_modules), or logits the model
        # transforms after its output layer: not F.linear(h, head.weight), so run the module's own forward (and the
        # model's transform) on the kept positions ([M, V] logits only: more memory than the chunks).
        logits = head(h)
        lp, ent = plain_logprobs(logits if transform is None else transform(logits), rows.targets, temperature)
        return lp, (ent.detach() if want_entropy else None)
    return chunked_logprobs(h, head.weight, getattr(head, "bias", None), rows.targets, temperature, chunk,
                            want_entropy)
