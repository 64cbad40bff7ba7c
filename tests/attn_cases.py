"""Shared test machinery: random inputs in every layout, and one check of a backend
(forward, lse and gradients) against the fp64 reference under the tolerance rule."""
from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fused_attn
from fused_attn import reference
from fused_attn.reference import CausalMode
from fused_attn.testing import assert_close

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


def check_backend(backend, q, k, v, mode: CausalMode, with_lse_grad=False, scale=None):
    """Run ``backend`` through the public API and check out, lse, dq, dk, dv. Returns the ratios."""
    L, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[-3] != k.shape[-3]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fused_attn.attention_with_lse(q, k, v, scale=scale, enable_gqa=gqa, backend=backend,
                                             **sdpa_causal_args(mode, L, S))
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_lse_grad else None

    def loss(o, l):
        total = (o.double() * dout.double()).sum()
        if dlse is not None:
            total = total + (torch.where(torch.isinf(l), 0.0, l.double()) * dlse.double()).sum()
        return total

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ratios = {}
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*hi, causal=mode, scale=scale, compute_dtype=torch.float64)
    base_out, base_lse = reference.attention(*lo, causal=mode, scale=scale)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), hi)
    base_grads = torch.autograd.grad(loss(base_out, base_lse), lo)
    ratios["out"] = assert_close(out, ref_out, base_out, "out")
    ratios["lse"] = assert_close(lse, ref_lse, base_lse, "lse", dtype=q.dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        ratios[name] = assert_close(g, r, b, name)
    return ratios
