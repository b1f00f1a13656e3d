"""Per-token log-probabilities of completions, without ever materialising [B, T, V] logits.

The backbone runs once over prompt+completion rows; only the hidden states that predict completion tokens are
kept (padding and prompt positions are dropped), and the output layer plus log-softmax run over them in chunks
of `chunk` tokens inside one autograd function that recomputes each chunk's logits in the backward pass. With
Qwen's 151,936-token vocabulary this is what keeps memory flat and avoids fp32 copies of the logits.
Logits are divided by the sampling temperature, as the generator's processed logprobs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """logp_i = log_softmax(h_i W^T / tau)[y_i], chunked; entropy computed alongside without grad.

    Passes over each [chunk, V] block are what cost (on CPU they outweigh the matmul): the forward takes one exp
    for both the log-sum-exp and the entropy, and keeps the log-sum-exp [M] so that the backward gets softmax(z) as
    exp(z - lse) in place, without another max and sum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, chunk: int, want_entropy: bool):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_entropy else None
        for s in range(0, n, chunk):
            z = F.linear(hidden[s:s + chunk], weight, bias).float() * inv_temp  # [c, V]
            top = z.amax(-1, keepdim=True)
            e = (z - top).exp_()  # softmax(z) * total
            total = e.sum(-1)
            lse[s:s + chunk] = top.squeeze(1) + total.log()
            logp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if want_entropy:  # H = lse - sum(p z)
                ent[s:s + chunk] = lse[s:s + chunk] - e.mul_(z).sum(-1) / total
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        ctx.mark_non_differentiable(*( [ent] if ent is not None else []))
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            z = F.linear(h, weight, bias).float() * ctx.inv_temp
            g = grad_logp[s:s + ctx.chunk].float()
            # d logp / d z = onehot(y) - softmax(z); chain through the 1/temperature scaling
            gz = z.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax(z)
            gz.scatter_add_(1, targets[s:s + ctx.chunk, None], g[:, None])
            gz.mul_(ctx.inv_temp)
            gz = gz.to(hidden.dtype)
            if need_h:
                gh[s:s + ctx.chunk] = gz @ weight
            if need_w:
                gw += (gz.t() @ h).float()
            if need_b:
                gb += gz.float().sum(0)
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None, None)


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     temperature: float = 1.0, chunk: int = 4096, want_entropy: bool = False):
    """hidden [M, H], weight [V, H], targets [M] -> (logp [M] fp32, entropy [M] fp32 or None)."""
    return _ChunkedLogprob.apply(hidden, weight, bias, targets, 1.0 / temperature, chunk, want_entropy)


def plain_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference path: full log-softmax. logits [M, V], targets [M] -> (logp [M], entropy [M])."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def causal_lm_parts(model: torch.nn.Module):
    """(backbone, output layer) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return backbone, base.get_output_embeddings()


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    if hasattr(head, "base_layer"):
        # A PEFT adapter on the output layer itself (e.g. LoRA with lm_head in target_modules): head(h) is not
        # F.linear(h, head.weight), so run the module's own forward on the kept positions ([M, V] logits only).
        lp, ent = plain_logprobs(head(h), rows.targets, temperature)
        return lp, (ent.detach() if want_entropy else None)
    return chunked_logprobs(h, head.weight, getattr(head, "bias", None), rows.targets, temperature, chunk,
                            want_entropy)
