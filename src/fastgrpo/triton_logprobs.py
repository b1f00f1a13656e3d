"""Fused row passes of the chunked log-softmax (logprobs.py) on CUDA, in Triton.

A chunk of logits [c, V] arrives in the matmul's dtype (bf16 in training). The torch path casts it to fp32 and
makes about eight elementwise passes over it (scale, max, subtract, exp, sums; in the backward again subtract, exp,
scale, cast): with Qwen's 151,936-entry vocabulary those passes, not the matmuls, were a quarter of a training
step (docs/benchmarks.md, section 10). Here one kernel reads each row once (online log-sum-exp, as flash attention
does) and the backward's kernel reads it once and writes d(loss)/d(logits) over it in place.

    row_stats(z, y, inv_t, entropy)  z [c, V], y [c] -> lse [c], z_y [c] (target logit) and entropy [c] or None,
                                     all fp32 and of the logits times inv_t
    row_grad_(z, lse, y, g, inv_t)   z [c, V] := g * inv_t * (onehot(y) - softmax(z * inv_t)), in z's dtype
    usable(device)                   whether to use them there: Triton importable, and on first use per device both
                                     kernels compiled and agreed with torch on a small problem (else a warning, and
                                     logprobs.py keeps its torch path for the rest of the process)
"""

from __future__ import annotations

import warnings

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed (CPU-only installs) or broken: logprobs.py keeps its torch path
    triton = None

BLOCK = 4096


if triton is not None:
    @triton.jit
    def _stats_kernel(Z, stride, Y, LSE, ZY, ENT, inv_t, V, BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = Z + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)   # running max (a scalar)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)                  # sum of exp(z - m)
        t = tl.sum(tl.zeros([BLOCK], tl.float32), 0)                  # sum of exp(z - m) * z (entropy)
        for start in range(0, V, BLOCK):
            inside = start + cols < V
            z = tl.load(base + start + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            new_m = tl.maximum(m, tl.max(z, 0))
            scale = tl.exp(m - new_m)
            e = tl.where(inside, tl.exp(z - new_m), 0.0)
            s = s * scale + tl.sum(e, 0)
            if ENTROPY:
                t = t * scale + tl.sum(tl.where(inside, e * z, 0.0), 0)
            m = new_m
        lse = m + tl.log(s)
        tl.store(LSE + row, lse)
        y = tl.load(Y + row)
        tl.store(ZY + row, tl.load(base + y).to(tl.float32) * inv_t)
        if ENTROPY:
            tl.store(ENT + row, lse - t / s)

    @triton.jit
    def _grad_kernel(Z, stride, Y, LSE, G, inv_t, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = Z + row * stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        g = tl.load(G + row).to(tl.float32) * inv_t
        y = tl.load(Y + row)
        for start in range(0, V, BLOCK):
            inside = start + cols < V
            z = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
            onehot = tl.where(start + cols == y, 1.0, 0.0)
            grad = (onehot - tl.exp(z - lse)) * g
            tl.store(base + start + cols, grad.to(Z.dtype.element_ty), mask=inside)


def row_stats(z: torch.Tensor, y: torch.Tensor, inv_t: float, entropy: bool):
    c, V = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    lse, zy = torch.empty(c, **f32), torch.empty(c, **f32)
    ent = torch.empty(c, **f32) if entropy else lse  # a placeholder pointer when unused
    if c:
        _stats_kernel[(c,)](z, z.stride(0), y.contiguous(), lse, zy, ent, float(inv_t), V, BLOCK=BLOCK,
                            ENTROPY=entropy, num_warps=8)
    return lse, zy, (ent if entropy else None)


def row_grad_(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, g: torch.Tensor, inv_t: float) -> torch.Tensor:
    c, V = z.shape
    if c:
        _grad_kernel[(c,)](z, z.stride(0), y.contiguous(), lse.contiguous(), g.float().contiguous(), float(inv_t), V,
                           BLOCK=BLOCK, num_warps=8)
    return z


_checked: dict[str, bool] = {}  # device -> the self-check's verdict, once per process


def usable(device: torch.device) -> bool:
    if triton is None or device.type != "cuda":
        return False
    key = str(device)
    if key not in _checked:
        _checked[key] = self_check(device)
    return _checked[key]


def self_check(device) -> bool:
    """Compile both kernels and compare them with torch on a [37, 9000] problem (a vocabulary over two blocks plus a
    remainder, bf16 logits, temperature 0.7); False, with a warning, if either fails or disagrees."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        z = (torch.randn(37, 9000, generator=g) * 3).to(device=device, dtype=torch.bfloat16)
        y = torch.randint(0, 9000, (37,), generator=g).to(device)
        grad_out = torch.randn(37, generator=g).to(device)
        from .logprobs import plain_logprobs  # the reference path (logprobs.py imports this module)

        lse, zy, ent = row_stats(z, y, 1 / 0.7, True)
        lp_ref, ent_ref = plain_logprobs(z, y, 0.7)
        ok = (torch.allclose(lse, torch.logsumexp(z.float() / 0.7, -1), atol=1e-3)
              and torch.allclose(zy - lse, lp_ref, atol=1e-3) and torch.allclose(ent, ent_ref, atol=1e-3))
        gz = row_grad_(z.clone(), lse, y, grad_out, 1 / 0.7).float()
        p = torch.softmax(z.float() / 0.7, -1)
        want = (torch.nn.functional.one_hot(y, 9000).float() - p) * grad_out[:, None] / 0.7
        ok = ok and torch.allclose(gz, want, atol=5e-2, rtol=2e-2)
        if not ok:
            warnings.warn("fastgrpo: the fused Triton log-softmax disagreed with torch on this device; using the torch "
                          "path (slower, same results).", stacklevel=2)
        return bool(ok)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile here must not stop training
        warnings.warn(f"fastgrpo: the fused Triton log-softmax does not run on {device} ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the torch path (slower, same results).", stacklevel=2)
        return False
