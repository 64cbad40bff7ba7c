"""Shared test machinery for every backend's kernel tests: the one case grid (each axis's
values named after the path they hit, and the subset each backend runs), random inputs in
every layout, and one check of a backend (forward, lse and gradients) against the fp64
reference under the tolerance rule (fused_attn.testing)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

import fused_attn
from fused_attn import dispatch, dropout, reference
from fused_attn.problem import make_problem
from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close, stores_bf16_by_truncation

CAUSAL_MODES = (CausalMode.NONE, CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT)

# ---- the case grid -------------------------------------------------------------------------
# Each axis maps a case id (named after the path it hits) to its values. The blocks the ids
# refer to: Triton's interpreter 32 x 32 (compiled 64-128); CUDA 128 query rows forward, 64 keys
# and 128 query rows backward; CPU 512 keys forward, 128 backward. A backend runs the subset
# SUBSETS names: the CUDA emulator a smaller one, as it is slow.

SEQLENS = {  # (L, S)
    "L1_one-S1_one": (1, 1),  # one row and one key: a single partial tile each side
    "L1_one-S64_whole": (1, 64),  # whole key blocks, no key tail
    "L1_one-S203_ragged": (1, 203),  # several key blocks, a ragged last one
    "L17_partial-S1_one": (17, 1),  # L > S: lower-right rows that see no key
    "L17_partial-S64_whole": (17, 64),
    "L17_partial-S203_ragged": (17, 203),
    "L113_ragged-S1_one": (113, 1),
    "L113_ragged-S64_whole": (113, 64),
    "L113_ragged-S203_ragged": (113, 203),  # L < S, ragged tails both sides
    "L97_ragged-S203_ragged": (97, 203),
    "L203_ragged-S97_ragged": (203, 97),  # L > S over several blocks: the causal diagonal crosses tiles
}
L_BY_S = [name for name in SEQLENS if name.startswith(("L1_", "L17_", "L113_"))]  # (1, 17, 113) x (1, 64, 203)
HEAD_DIMS = {  # (E, Ev)
    "E8_below_dot_min": (8, 8),  # Triton pads it to its smallest dot (16)
    "E16": (16, 16),
    "E32_cuda_smallest_bucket": (32, 32),
    "E40_not_pow2": (40, 40),  # masked inside Triton's 64-wide block; CUDA bucket 64
    "E64": (64, 64),
    "E72_inside_bucket": (72, 72),  # CUDA bucket 96; Triton masked inside 128
    "E111_not_multiple_of_8": (111, 111),  # CUDA zero-pads it to 112 -> bucket 128
    "E128": (128, 128),
    "E160": (160, 160),
    "E192": (192, 192),
    "E224": (224, 224),
    "E256_largest": (256, 256),
    "E72_Ev40_narrower_v": (72, 40),
    "E16_Ev256_wider_v": (16, 256),
    "E32_Ev128_wider_v": (32, 128),
}
GQA = {  # Hk under Hq = 6 query heads; dK/dV sum over each kv head's group
    "mqa_6to1": 1,
    "gqa_6to2": 2,
    "gqa_6to3": 3,
}
LAYOUTS = {  # make_inputs' layouts other than "contiguous"
    "blhe": "blhe",  # (B, L, H, E) views: strided heads and rows
    "sliced": "sliced",  # column slices of a wider tensor
    "broadcast": "broadcast",  # stride-0 batch for k and v
    "transposed": "transposed",  # head dim not unit-stride: the launchers copy
    "mixed": "mixed",  # q (B, L, H, E) view, k head dim not unit-stride, v stride-0 heads
}
SUBSETS = {
    "cpu": {
        "seqlens": L_BY_S + ["L203_ragged-S97_ragged"],
        "head_dims": ["E16", "E40_not_pow2", "E64", "E72_inside_bucket", "E128", "E256_largest",
                      "E72_Ev40_narrower_v", "E16_Ev256_wider_v"],
        "gqa": list(GQA),
        "layouts": list(LAYOUTS),
    },
    "triton": {
        "seqlens": L_BY_S + ["L203_ragged-S97_ragged"],
        "seqlens_fp32_bf16": ["L97_ragged-S203_ragged", "L203_ragged-S97_ragged"],
        "head_dims": ["E16", "E40_not_pow2", "E64", "E72_inside_bucket", "E111_not_multiple_of_8", "E128",
                      "E256_largest", "E8_below_dot_min", "E72_Ev40_narrower_v", "E32_Ev128_wider_v"],
        "gqa": list(GQA),
        "layouts": ["blhe", "sliced", "broadcast", "transposed"],
    },
    "cuda": {  # the emulator: one seqlen case per path, every head-dim bucket
        "seqlens": ["L1_one-S1_one", "L17_partial-S64_whole", "L113_ragged-S203_ragged", "L203_ragged-S97_ragged"],
        "head_dims": ["E32_cuda_smallest_bucket", "E64", "E72_inside_bucket", "E128", "E160", "E192", "E224",
                      "E256_largest", "E111_not_multiple_of_8", "E72_Ev40_narrower_v", "E16_Ev256_wider_v"],
        "gqa": list(GQA),
        "layouts": ["blhe", "sliced", "broadcast"],
    },
}
_AXES = {"seqlens": SEQLENS, "head_dims": HEAD_DIMS, "gqa": GQA, "layouts": LAYOUTS}


def grid(axis: str, backend: str, subset: str = None) -> list:
    """``backend``'s cases of ``axis`` (SUBSETS[backend][subset or axis]) as pytest params, each
    with its id."""
    values = _AXES[axis]
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), id=name)
            for name in SUBSETS[backend][subset or axis] for v in (values[name],)]


def mode_id(mode: CausalMode) -> str:
    return mode.name.lower()


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
    """q, k, v of shapes (B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev) with fresh random values
    (standard normal, drawn in fp32 and rounded to ``dtype``; fp64 drawn in fp64).

    layout "blhe": views of (B, L, H, E) tensors (the layout after a linear projection);
    "sliced": k and v are column slices of one wider tensor (strided rows);
    "broadcast": k and v have batch 1 expanded to B (stride 0);
    "transposed": the head dim is not the unit-stride dim (the kernels' launchers copy);
    "mixed": q a (B, L, H, E) view, k with head-dim stride 2 * Hk (copied), v stride-0 heads (Ev = E).
    """
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                           device=device).to(dtype)
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
    elif layout == "mixed":
        if Ev != E:
            raise ValueError(f"layout 'mixed' needs Ev == E, got E={E}, Ev={Ev}")
        q = rnd(B, L, Hq, E).transpose(1, 2)
        k = rnd(B, S, 2 * E, Hk)[:, :, ::2].permute(0, 3, 1, 2)
        v = rnd(B, 1, S, E).expand(B, Hk, S, E)
    else:
        raise ValueError(layout)
    return q, k, v


def run_attention(backend, q, k, v, mode: CausalMode, kwargs: dict, backward: bool, lse_grad: bool, seed: int,
                  compute_dtype=None) -> dict:
    """out, lse and, with ``backward``, dq, dk, dv of one attention call.

    ``backend`` None runs the reference (``fused_attn.reference``) in ``compute_dtype`` (None:
    the inputs' dtype, i.e. plain PyTorch); a name runs that backend through the public API
    with ``kwargs`` (``scale``, ``enable_gqa``, the causal arguments, ``window``, a mask tensor: the
    reference takes the same mask as its ``attn_mask``). The gradients are those of
    ``sum(out * dout) + sum(lse * dlse)`` (lse's -inf entries left out), ``dout`` and ``dlse``
    drawn from ``seed`` in the inputs' dtype, so every run of one call sees the same values.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the call's dropout seed (drawn from torch's generator), the same in every run
    if backend is None:
        leaves = [t.detach().to(compute_dtype or q.dtype).requires_grad_(backward) for t in (q, k, v)]
        mask, slopes = kwargs.get("attn_mask"), kwargs.get("alibi_slopes")
        p_drop = kwargs.get("dropout_p", 0.0)
        out, lse = reference.attention(*leaves, attn_mask=None if isinstance(mask, CausalBias) else mask,
                                       dropout_p=p_drop, causal=mode, scale=kwargs.get("scale"),
                                       window=kwargs.get("window", (-1, -1)),
                                       alibi_slopes=None if slopes is None else slopes.reshape(-1, q.shape[-3]),
                                       softcap=kwargs.get("softcap", 0.0),
                                       dropout_seed=dropout.draw_seed() if p_drop else None,
                                       compute_dtype=compute_dtype)
    else:
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        out, lse = fused_attn.attention_with_lse(*leaves, backend=backend, **kwargs)
    results = {"out": out.detach(), "lse": lse.detach()}
    if backward:
        dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=q.dtype).double()
        total = (out.double() * dout).sum()
        if lse_grad:
            dlse = torch.randn(lse.shape, generator=g).to(lse.device).double()
            total = total + (torch.where(torch.isinf(lse), 0.0, lse.double()) * dlse).sum()
        results.update(zip(("dq", "dk", "dv"), torch.autograd.grad(total, leaves)))
    return results


def check_backend(backend, q, k, v, mode: CausalMode, with_lse_grad=False, scale=None, backward=True,
                  window=(-1, -1), attn_mask=None, alibi_slopes=None, softcap=0.0, dropout_p=0.0):
    """Run ``backend`` through the public API and check out, lse and (with ``backward``) dq, dk,
    dv against the fp64 reference under the tolerance rule; out keeps the inputs' dtype, lse is
    fp32 (fp64 for fp64 inputs). ``window``, a mask tensor ``attn_mask`` (not with
    lower-right causal, which is itself the mask argument), ``alibi_slopes`` ((Hq,) or
    (B, Hq)), ``softcap`` and ``dropout_p`` (with one seed: both drop the same elements) go to
    both. Returns the max error ratio of each result."""
    L, S = q.shape[-2], k.shape[-2]
    kwargs = dict(scale=scale, enable_gqa=q.shape[-3] != k.shape[-3], **sdpa_causal_args(mode, L, S))
    if window != (-1, -1):
        kwargs["window"] = window
    if attn_mask is not None:
        assert "attn_mask" not in kwargs, "a mask tensor with lower-right causal: pass one of them"
        kwargs["attn_mask"] = attn_mask
    if alibi_slopes is not None:
        kwargs["alibi_slopes"] = alibi_slopes
    if softcap:
        kwargs["softcap"] = softcap
    if dropout_p:
        kwargs["dropout_p"] = dropout_p
    seed = int(torch.randint(2 ** 31, ()))
    got = run_attention(backend, q, k, v, mode, kwargs, backward, with_lse_grad, seed)
    ref = run_attention(None, q, k, v, mode, kwargs, backward, with_lse_grad, seed, compute_dtype=torch.float64)
    base = run_attention(None, q, k, v, mode, kwargs, backward, with_lse_grad, seed)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert got["out"].dtype == q.dtype and got["lse"].dtype == lse_dtype, (got["out"].dtype, got["lse"].dtype)
    truncated = stores_bf16_by_truncation(backend, q.dtype)  # the Triton interpreter's bf16 stores
    ratios = {}
    for name in ("out", "lse", "dq", "dk", "dv")[:5 if backward else 2]:
        if name == "lse":  # fp32, stored without rounding to the inputs' dtype; the floor is the inputs'
            ratios[name] = assert_close(got[name], ref[name], base[name], name, dtype=q.dtype)
        else:
            ratios[name] = assert_close(got[name], ref[name], base[name], name, truncated_bf16=truncated)
    return ratios


# ---- the gradient of a float mask that requires grad ---------------------------------------

MASK_GRAD_CASES = {  # id -> (mask shape, query heads (3 kv heads), L, S, extra keyword arguments)
    "full": ((2, 3, 70, 131), 3, 70, 131, {}),
    "broadcast_batch_heads_causal": ((70, 131), 3, 70, 131, {"is_causal": True}),
    "per_batch_window_across_blocks": ((2, 1, 300, 333), 3, 300, 333, {"window": (90, 10)}),
    "broadcast_rows_softcap": ((2, 3, 1, 131), 3, 70, 131, {"softcap": 2.0}),
    "dropout_gqa": ((2, 6, 70, 131), 6, 70, 131, {"dropout_p": 0.3}),
    # rows 0-39 see keys i + 35 .. i + 85: no row visits the first 32 keys (the interpreter's tile is 32 x 32)
    "small_window_dropout_gqa": ((2, 6, 40, 100), 6, 40, 100, {"window": (25, 25), "dropout_p": 0.3}),
}
# the interpreter's subset (the larger windows and dropout cases cost it a minute each)
MASK_GRAD_INTERPRETED = ("full", "broadcast_batch_heads_causal", "broadcast_rows_softcap", "small_window_dropout_gqa")


def check_mask_gradient(backend, case, dtype, device="cpu"):
    """A float mask (MASK_GRAD_CASES[case]) that requires grad gets its gradient (dS, summed over the
    dims it broadcasts over) from ``backend``'s kernels, as the reference (torch's autograd) gives it,
    and dq, dk, dv with it; checked against the fp64 reference under the tolerance rule."""
    shape, Hq, L, S, kw = MASK_GRAD_CASES[case]
    q, k, v = make_inputs(2, Hq, 3, L, S, 40, 24, dtype, device)
    mask = torch.randn(shape, dtype=dtype, device=device)
    dout = torch.randn(2, Hq, L, 24, dtype=dtype, device=device)
    p = make_problem(q, k, v, mask.requires_grad_(), enable_gqa=Hq != 3, **kw)
    assert "mask_grad" in p.features() and dispatch.refusals(p, explicit=True)[backend] is None
    grads = {}
    for run, name, dt in ((backend, backend, dtype), ("ref", "reference", torch.float64),
                          ("base", "reference", dtype)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, mask)]
        torch.manual_seed(7)  # one dropout seed for every run
        out = fused_attn.scaled_dot_product_attention(*leaves[:3], leaves[3], enable_gqa=Hq != 3, backend=name, **kw)
        grads[run] = torch.autograd.grad((out * dout.to(dt)).sum(), leaves)
    truncated = stores_bf16_by_truncation(backend, dtype)
    for name, got, ref, base in zip(("dq", "dk", "dv", "dmask"), grads[backend], grads["ref"], grads["base"]):
        assert got.shape == ref.shape and got.dtype == dtype, (name, got.shape, got.dtype)
        assert_close(got, ref, base, name, truncated_bf16=truncated and name != "dmask")  # dmask: torch's .to
