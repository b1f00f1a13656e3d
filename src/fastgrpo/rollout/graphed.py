"""Decoding for the transformers generator on GPUs: a static KV cache and one CUDA graph per decoding step.

Without vLLM, a decoding step of a small model on a GPU is bound by launching kernels, not by computing them:
`generate` runs ~25 layers of eager PyTorch modules (several hundred kernel launches and their Python around them),
grows a dynamic cache by concatenation, and checks its stopping criteria with a host sync, for a few milliseconds of
GPU work per step. Here every tensor a step touches has a fixed address, so the step is captured once per `decode`
call and replayed:

- `StaticKV`: keys and values [B, kv_heads, prompt width + max_new_tokens, head_dim] per layer, written in place at
  column `col`, a device tensor; the attention layers call its `update` as they would any transformers cache.
- The attention mask is built here, as a boolean [B, 1, T, L] handed to the backbone ready-made (the mapping
  {"full_attention": mask} that `generate` itself passes), so no mask code with host-side branches runs in a step.
  Every query may attend to itself, so padded positions never see an all-masked row (whose softmax is NaN).
- During the captured steps the layers use `grouped_attention`: queries grouped by their KV head, so the cached
  keys and values are read once instead of being repeated per query head (transformers' SDPA path repeats them
  whenever there is a mask). The prompt pass uses the model's own attention implementation.
- Sampling stays outside the graph, on the [B, V] logits the graph leaves in a fixed buffer, and tokens collect on
  the device; the host looks at them every `CHECK_EVERY` steps to stop once every row has emitted EOS.

`decode(..., graph=False)` runs the same steps eagerly; that is how the CPU tests check it token for token against
greedy `generate`. Used by `HFGenerator` on CUDA for full-attention decoder models (no sliding-window layers) with
`sdpa` or `eager` attention, whose logits are the output layer's own, with any sampling settings except a repetition
penalty or extra generation arguments; everything else goes through `generate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .decode import cache_kwarg

#: Steps between host checks for "every row has emitted EOS" (each check waits for the GPU to catch up).
CHECK_EVERY = 32
ATTENTION = "fastgrpo_grouped"


class StaticKV:
    """A KV cache with fixed addresses: [B, kv_heads, length, head_dim] per layer, written at column `col` on."""

    def __init__(self, length: int, device: torch.device) -> None:
        self.length = length
        self.col = torch.zeros((), dtype=torch.long, device=device)  # first column the next update writes
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value [B, kv_heads, T, D] -> the layer's whole cache [B, kv_heads, length, D] (keys, values)."""
        if layer_idx not in self.keys:
            B, h, _, d = key.shape
            self.keys[layer_idx] = key.new_zeros(B, h, self.length, d)
            self.values[layer_idx] = value.new_zeros(B, h, self.length, value.shape[-1])
        cols = self.col + torch.arange(key.shape[2], device=key.device)
        self.keys[layer_idx].index_copy_(2, cols, key)
        self.values[layer_idx].index_copy_(2, cols, value)
        return self.keys[layer_idx], self.values[layer_idx]


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, L, D], attention_mask bool [B, 1, T, L] (True: attend) or additive
    float -> (output [B, T, H, D], None). Query head h reads KV head h // (H / Hkv), as transformers' repeat_kv."""
    B, H, T, D = query.shape
    hkv, L = key.shape[1], key.shape[2]
    g = H // hkv
    scores = torch.matmul(query.reshape(B, hkv, g * T, D), key.transpose(2, 3)).view(B, hkv, g, T, L) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :L]  # [B, 1, 1, T, L]
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).view(B, hkv, g * T, L)
    out = torch.matmul(probs, value).view(B, H, T, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_attention)


@contextlib.contextmanager
def _attention(model: torch.nn.Module, name: str):
    """Every config under `model` set to attention implementation `name`, restored on exit."""
    from transformers import PretrainedConfig

    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def supported(backbone: torch.nn.Module) -> bool:
    """Whether `decode` handles this backbone: full attention in every layer, through sdpa or eager."""
    cfg = getattr(backbone, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types) and not getattr(backbone, "has_sliding_layers", False)


@torch.no_grad()
def decode(backbone: torch.nn.Module, head: torch.nn.Module, draw: Callable[[torch.Tensor], torch.Tensor],
           ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_ids: list[int],
           graph: bool = True, autocast: torch.dtype | None = None) -> list[list[int]]:
    """Left-padded prompts ids [B, W] -> each row's new tokens [B][<= max_new_tokens], cut after its first EOS.

    `head` maps the last hidden states [B, H] to logits [B, V]; `draw` maps logits to next tokens [B]."""
    B, W = ids.shape
    device = ids.device
    cache_kw = cache_kwarg(backbone)
    kv = StaticKV(W + max_new_tokens, device)
    valid = torch.zeros(B, kv.length, dtype=torch.bool, device=device)  # keys each row may attend to
    valid[:, :W] = attention_mask.bool()
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    causal = torch.ones(W, kv.length, dtype=torch.bool, device=device).tril_()
    prefill_mask = (valid[:, None, None, :] & causal) | torch.eye(W, kv.length, dtype=torch.bool, device=device)
    if backbone.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        prefill_mask = torch.zeros(prefill_mask.shape, device=device).masked_fill_(~prefill_mask, float("-inf"))

    def amp():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast, cache_enabled=False)

    with amp():
        out = backbone(input_ids=ids, attention_mask=prefill_mask, position_ids=pos,
                       use_cache=True, **{cache_kw: kv})
        logits = head(out.last_hidden_state[:, -1])
    del out, prefill_mask, causal

    tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # the step's input token, position and mask
    step_pos = pos[:, -1:] + 1
    step_mask = valid[:, None, None, :]
    kv.col.fill_(W)

    def step() -> torch.Tensor:
        with amp():
            h = backbone(input_ids=tok, attention_mask=step_mask, position_ids=step_pos,
                         use_cache=True, **{cache_kw: kv}).last_hidden_state[:, -1]
            return head(h)

    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    replay = None
    n = max_new_tokens
    _register()
    with _attention(backbone, ATTENTION):
        for i in range(max_new_tokens):
            t = draw(logits)
            new[:, i] = t
            done |= torch.isin(t, eos)
            if i == max_new_tokens - 1 or ((i + 1) % CHECK_EVERY == 0 and bool(done.all())):
                n = i + 1
                break
            tok.copy_(t[:, None])
            if i:
                kv.col.add_(1)
                step_pos.add_(1)
            step_mask.index_fill_(-1, kv.col.view(1), True)
            if replay is None:
                replay = _capture(step) if graph and device.type == "cuda" else step
            logits = replay()
    rows = new[:, :n].tolist()
    stops = set(eos_ids)
    return [next((r[:j + 1] for j, t in enumerate(r) if t in stops), r) for r in rows]


def _capture(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """step captured in a CUDA graph -> a function that replays it and returns its output buffer. Warm-up runs
    compute the same step (they write the same cache column), so the first replay's inputs are unchanged."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    # thread_local: the training thread of the one-step off-policy mode may use CUDA while this thread captures
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        out = step()

    def replay() -> torch.Tensor:
        g.replay()
        return out

    replay.graph = g  # kept alive with the closure
    return replay
