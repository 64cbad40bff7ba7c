"""Shared test machinery: random inputs in every layout, and one check of a backend
(forward, lse and gradients) against the fp64 reference under the tolerance rule."""
from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fused_attn
from fused_attn import reference
from fused_attn.reference import CausalMode
from fused_attn.testing import assert_close, stores_bf16_by_truncation

CAUSAL_MODES = (CausalMode.NONE, CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT)


def sdpa_causal_args(mode: CausalMode, L: int, S: int) -> dict:
    """The public-API arguments that ask for causal mode ``mode``."""
    if mode is CausalMode.NONE:
        return {}
    if mode is CausalMode.UPPER_LEFT:
        return {"is_causal": True}
    import warnings
    with warnings.catch_warnings():  # torch warns that its own math path gives NaN for L > S
        warnings.simplefilter("ignore")
        return {"attn_mask": causal_lower_right(L, S)}


def make_inputs(B, Hq, Hk, L, S, E, Ev, dtype, device="cpu", layout="contiguous"):
    """q, k, v of shapes (B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev) with fresh random values.

    layout "blhe": views of (B, L, H, E) tensors (the layout after a linear projection);
    "sliced": k and v are column slices of one wider tensor (strided rows);
    "broadcast": k and v have batch 1 expanded to B (stride 0);
    "transposed": the head dim is not the unit-stride dim (the kernels' launchers copy).
    """
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)
    if layout == "contiguous":
        q, k, v = rnd(B, Hq, L, E), rnd(B, Hk, S, E), rnd(B, Hk, S, Ev)
    elif layout == "blhe":
        q, k, v = (rnd(B, n, H, d).transpose(1, 2) for n, H, d in ((L, Hq, E), (S, Hk, E), (S, Hk, Ev)))
    elif layout == "sliced":
        q = rnd(B, Hq, L, E + 8)[..., 3:3 + E]
        kv = rnd(B, Hk, S, E + Ev + 5)
        k, v = kv[..., :E], kv[..., E + 5:]
    elif layout == "broadcast":
        q = rnd(B, Hq, L, E)
        k, v = rnd(1, Hk, S, E).expand(B, -1, -1, -1), rnd(1, Hk, S, Ev).expand(B, -1, -1, -1)
    elif layout == "transposed":
        q, k, v = (rnd(B, H, d, n).transpose(-1, -2) for n, H, d in ((L, Hq, E), (S, Hk, E), (S, Hk, Ev)))
    else:
        raise ValueError(layout)
    return q, k, v


def run_attention(backend, q, k, v, mode: CausalMode, kwargs: dict, backward: bool, lse_grad: bool, seed: int,
                  compute_dtype=None) -> dict:
    """out, lse and, with ``backward``, dq, dk, dv of one attention call.

    ``backend`` None runs the reference (``fused_attn.reference``) in ``compute_dtype`` (None:
    the inputs' dtype, i.e. plain PyTorch); a name runs that backend through the public API
    with ``kwargs`` (``scale``, ``enable_gqa``, the causal arguments). The gradients are those of
    ``sum(out * dout) + sum(lse * dlse)`` (lse's -inf entries left out), ``dout`` and ``dlse``
    drawn from ``seed`` in the inputs' dtype, so every run of one call sees the same values.
    """
    g = torch.Generator().manual_seed(seed)
    if backend is None:
        leaves = [t.detach().to(compute_dtype or q.dtype).requires_grad_(backward) for t in (q, k, v)]
        out, lse = reference.attention(*leaves, causal=mode, scale=kwargs.get("scale"), compute_dtype=compute_dtype)
    else:
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        out, lse = fused_attn.attention_with_lse(*leaves, backend=backend, **kwargs)
    results = {"out": out.detach(), "lse": lse.detach()}
    if backward:
        dout = torch.randn(out.shape, generator=g).to(q.dtype).double()
        total = (out.double() * dout).sum()
        if lse_grad:
            dlse = torch.randn(lse.shape, generator=g).double()
            total = total + (torch.where(torch.isinf(lse), 0.0, lse.double()) * dlse).sum()
        results.update(zip(("dq", "dk", "dv"), torch.autograd.grad(total, leaves)))
    return results


def check_backend(backend, q, k, v, mode: CausalMode, with_lse_grad=False, scale=None):
    """Run ``backend`` through the public API and check out, lse, dq, dk, dv. Returns the ratios."""
    L, S = q.shape[-2], k.shape[-2]
    kwargs = dict(scale=scale, enable_gqa=q.shape[-3] != k.shape[-3], **sdpa_causal_args(mode, L, S))
    seed = int(torch.randint(2 ** 31, ()))
    got = run_attention(backend, q, k, v, mode, kwargs, True, with_lse_grad, seed)
    ref = run_attention(None, q, k, v, mode, kwargs, True, with_lse_grad, seed, compute_dtype=torch.float64)
    base = run_attention(None, q, k, v, mode, kwargs, True, with_lse_grad, seed)
    truncated = stores_bf16_by_truncation(backend, q.dtype)  # the Triton interpreter's bf16 stores
    ratios = {}
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name == "lse":  # fp32, stored without rounding to the inputs' dtype; the floor is the inputs'
            ratios[name] = assert_close(got[name], ref[name], base[name], name, dtype=q.dtype)
        else:
            ratios[name] = assert_close(got[name], ref[name], base[name], name, truncated_bf16=truncated)
    return ratios
