"""A lean decoding loop for the transformers generator on CPU: plain temperature sampling straight from hidden states.

At the recipe's settings on CPU, `generate` spent most of a decoding step on passes over the [B, 151,936] logits
rather than on the model: the output layer writes them to memory, then a float copy, the temperature division,
softmax, cumulative sum, the -inf fill that forces the drawn token, and greedy's argmax each read or write all of
them again. Here the backbone runs with its KV cache as in `generate`, and `sample_tiles` draws each row's next
token from tiles of [rows, `block`] logits that stay in cache, so the full logits never exist:

1. For each vocabulary block, its logits (h W_b^T / temperature), their max, and their mass sum(exp(z - max)),
   with the running max and mass rescaled as in an online softmax.
2. A block is chosen per row with probability proportional to its mass by weighted reservoir sampling: block b
   replaces the held one with probability mass_b / (mass of blocks 0..b), one uniform per row and block.
3. Inside the chosen block (its logits are kept when it is taken), the token by inverse CDF.

So each token is drawn with probability softmax(z / temperature), exactly as `generate` would sample it. Rows leave
the batch (and the cache) once they emit EOS. Used only where it is the same distribution: temperature > 0 and no
top-k, top-p, min-p, repetition penalty or extra generation arguments, and a whole model (an FSDP2-sharded one
gathers its root's parameters around forward(), which this loop bypasses, and its ranks must step in lockstep);
everything else goes through `generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Vocabulary entries per tile: [128 rows, 4096] fp32 is 2 MB, the L2 of the two cores this was measured on.
BLOCK = 4096


@torch.no_grad()
def sample_tiles(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                 block: int = BLOCK) -> torch.Tensor:
    """h [B, H], weight [V, H] -> one token per row [B] drawn from softmax((h W^T + bias) / temperature)."""
    B, V = h.shape[0], weight.shape[0]
    inv_t = 1.0 / temperature
    top = mass = None
    chosen = torch.zeros(B, dtype=torch.long, device=h.device)
    held = torch.full((B, min(block, V)), float("-inf"), device=h.device)  # logits of each row's chosen block
    for lo in range(0, V, block):
        z = F.linear(h, weight[lo:lo + block], None if bias is None else bias[lo:lo + block]).float() * inv_t
        new_top = z.amax(-1) if top is None else torch.maximum(top, z.amax(-1))
        m = (z - new_top[:, None]).exp_().sum(-1)  # this block's mass, in the scale of the running max
        if top is None:
            mass, take = m, torch.arange(B, device=h.device)
        else:
            mass = mass * (top - new_top).exp() + m
            take = (torch.rand(B, device=h.device) * mass < m).nonzero().squeeze(1)  # P = m / mass so far
        if take.numel():
            chosen[take] = lo
            held[take] = float("-inf")  # a short last block leaves the rest of the row at -inf
            held[take, :z.shape[1]] = z[take]
        top = new_top
    cdf = (held - held.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    u = torch.rand(B, 1, device=h.device) * cdf[:, -1:]
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=held.shape[1] - 1).squeeze(1)  # first index with cdf > u
    return chosen + k


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts -> (ids, attention_mask), both [B, longest] int64, left-padded: every prompt ends where
    generation starts."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    return ids, att


def cache_kwarg(backbone: torch.nn.Module) -> str:
    """The backbone's KV-cache argument: `cache` in transformers 5.2x (argument and output), `past_key_values`
    before."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(backbone: torch.nn.Module, pick: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
           attention_mask: torch.Tensor, max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
    """Left-padded prompts ids [B, L] -> each row's new tokens, up to and including its first EOS.

    `backbone` maps ids to final hidden states (the causal LM without its output layer); `pick` maps the last
    hidden states [b, H] to next tokens [b] (`sample_tiles` with the output layer, or argmax in tests)."""
    B = ids.shape[0]
    att = attention_mask
    pos = (att.cumsum(-1) - 1).clamp_(min=0)
    cache_kw = cache_kwarg(backbone)
    out = backbone(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache, h = getattr(out, "cache", None), out.last_hidden_state[:, -1]
    if cache is None:
        cache = out.past_key_values
    nxt = pos[:, -1] + 1
    live = torch.arange(B)  # the original row of each row still decoding
    eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
    new: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        tok = pick(h)
        for r, t in zip(live.tolist(), tok.tolist()):
            new[r].append(t)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(tok, eos)
        if done.any():  # finished rows leave the batch: no more compute for them
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            live, tok, att, nxt = live[keep.cpu()], tok[keep], att[keep], nxt[keep]
        att = torch.cat([att, att.new_ones(att.shape[0], 1)], dim=1)
        out = backbone(input_ids=tok[:, None], attention_mask=att, position_ids=nxt[:, None], use_cache=True,
                       **{cache_kw: cache})
        h, nxt = out.last_hidden_state[:, -1], nxt + 1
    return new
