"""torch's semantics wherever torch accepts a call: calls at the edge of what torch's SDPA and
nn.MultiheadAttention accept (ranks that differ, head broadcasting, GQA with different key and
value head counts, a mask together with is_causal, empty dims, dropout_p = 1, a float32 mask with
16-bit inputs), each compared with torch on the same inputs: shapes, values and gradients. What
torch rejects, fused_attn rejects too; where fused_attn deliberately differs, a test pins it.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import testing
from fused_attn.nn import MultiheadAttention
from test_api import BAD_INPUTS


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# (q shape, k shape, v shape, kwargs, the kernels run it): each a call torch accepts
CASES = {
    "q_rank3_kv_rank4": ((3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}, True),
    "q_rank2_kv_rank4": ((5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}, True),
    "q_rank4_kv_rank3": ((2, 3, 5, 8), (3, 6, 8), (3, 6, 8), {}, True),
    "q_rank3_kv_rank5": ((3, 5, 8), (2, 2, 3, 6, 8), (2, 2, 3, 6, 8), {}, True),
    "k_rank3_v_rank4": ((2, 3, 5, 8), (3, 6, 8), (2, 3, 6, 8), {}, True),
    "one_query_head": ((2, 1, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}, True),
    "one_kv_head": ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}, True),
    "one_key_head_three_value_heads": ((2, 3, 5, 8), (2, 1, 6, 8), (2, 3, 6, 8), {}, True),
    "gqa_key3_value2": ((2, 6, 5, 8), (2, 3, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}, True),
    "gqa_key2_value1": ((2, 6, 5, 8), (2, 2, 6, 8), (2, 1, 6, 8), {"enable_gqa": True}, True),
    "gqa_batch_broadcast": ((2, 6, 5, 8), (1, 3, 6, 8), (3, 6, 8), {"enable_gqa": True, "is_causal": True}, True),
    "bool_mask_and_causal": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"attn_mask": "bool", "is_causal": True},
                             False),
    "float_mask_and_causal_L>S": ((2, 3, 7, 8), (2, 3, 5, 8), (2, 3, 5, 8),
                                  {"attn_mask": "float", "is_causal": True}, False),
    "dropout_1": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"dropout_p": 1.0}, True),
    "L=0": ((2, 3, 0, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"is_causal": True}, True),
    "S=0": ((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 8), {}, True),
    "S=0_causal_gqa": ((2, 6, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8), {"is_causal": True, "enable_gqa": True}, True),
    "S=0_mask": ((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 8), {"attn_mask": "bool"}, False),
    "B=0": ((0, 3, 5, 8), (0, 3, 6, 8), (0, 3, 6, 8), {}, True),
    "H=0": ((2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8), {}, True),
    "Ev=0": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 0), {}, False),
    "E=0": ((2, 3, 5, 0), (2, 3, 6, 0), (2, 3, 6, 8), {"is_causal": True}, False),
    "fully_masked_row": ((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), {"attn_mask": "row 2 masked"}, False),
    "fully_masked_row_float": ((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), {"attn_mask": "row 2 -inf"}, False),
}


def _resolve(kwargs, L, S):
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bool":
        mask = torch.rand(L, S) > 0.4
        mask[:, :1] = True  # no fully masked row (those are cases of their own)
        kwargs["attn_mask"] = mask
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = rand(L, S)
    elif kwargs.get("attn_mask") in ("row 2 masked", "row 2 -inf"):  # torch 2.13: zeros, zero gradients
        mask = torch.rand(L, S) > 0.4
        mask[:, :1] = True
        mask[2] = False
        kwargs["attn_mask"] = mask if kwargs["attn_mask"] == "row 2 masked" else (
            torch.zeros(L, S, dtype=torch.float64).masked_fill(~mask, float("-inf")))
    return kwargs


@pytest.mark.parametrize("case,backend", [(c, b) for c in CASES for b in ("reference", "cpu", None)
                                          if b != "cpu" or CASES[c][4]])  # see test_kernels_refuse_by_name
def test_matches_torch(case, backend):
    qs, ks, vs, kwargs, _ = CASES[case]
    q, k, v = (rand(*s).requires_grad_() for s in (qs, ks, vs))
    kwargs = _resolve(kwargs, qs[-2], ks[-2])
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # automatic choice says it fell back to the reference
        if "dropout_p" in kwargs:  # attention_with_lse has no dropout
            got, lse = fused_attn.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs), None
        else:
            got, lse = fused_attn.attention_with_lse(q, k, v, backend=backend, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    if lse is not None:
        assert lse.shape == want.shape[:-1]
        if kwargs.get("attn_mask") is None and 0 not in lse.shape:  # a mask-free call: finite unless no key
            assert bool(torch.isfinite(lse).all()) == (ks[-2] > 0)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))


def test_kernels_refuse_by_name():
    """Calls the fused kernels cannot run raise with the reason when a kernel is asked for by name."""
    q = rand(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="head dims up to 256 are supported, got E = 8, Ev = 300"):
        fused_attn.scaled_dot_product_attention(q, q, rand(1, 2, 4, 300), backend="cpu")
    with pytest.raises(RuntimeError, match="head dims of 0 are not supported, got E = 0, Ev = 8"):
        fused_attn.scaled_dot_product_attention(q[..., :0], q[..., :0], q, backend="cpu")


def test_mask_and_causal_both_apply():
    """torch (its default dispatch) applies attn_mask and upper-left is_causal together."""
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    both = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, backend="reference")
    combined = mask & torch.ones(5, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(both, fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=combined,
                                                                             backend="reference"))
    assert not torch.allclose(both, fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                            backend="reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_mask_with_16bit_inputs(dtype):
    """torch accepts a float32 additive mask for 16-bit q/k/v; checked under the tolerance rule."""
    q, k, v = (rand(2, 3, 9, 16).to(dtype).requires_grad_() for _ in range(3))
    mask = rand(9, 9, dtype=torch.float32)
    got = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask.double())
    assert got.dtype == base.dtype == dtype
    testing.assert_close(got, ref, base, "output")
    g = torch.randn(ref.shape, dtype=torch.float64)
    for name, a, r, b in zip("qkv", torch.autograd.grad(got, (q, k, v), g.to(dtype)),
                             torch.autograd.grad(ref, (q64, k64, v64), g),
                             torch.autograd.grad(base, (q, k, v), g.to(dtype))):
        testing.assert_close(a, r, b, f"grad {name}")


# What torch's SDPA rejects, fused_attn rejects (tests/test_api.py checks fused_attn's messages). Not
# here: a CausalBias built for other lengths, and key and value of different lengths, which torch 2.13's
# default CPU dispatch accepts and computes something for (its math path rejects the latter).
TORCH_REJECTS = [b for b in BAD_INPUTS if b[0] not in ("bias lengths", "kv length")]


@pytest.mark.parametrize("name,make,kwargs,message", TORCH_REJECTS, ids=[b[0] for b in TORCH_REJECTS])
def test_torch_rejects_these_too(name, make, kwargs, message):
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
        F.scaled_dot_product_attention(*make(), **kwargs)


# ---- nn.MultiheadAttention ----

@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_mha_extra_key_with_causal_hint(extra, need_weights):
    """add_bias_kv / add_zero_attn with a causal attn_mask and is_causal=True: torch applies the padded
    mask when need_weights=True (the extra key visible to every query) and is_causal otherwise."""
    E, H, N, L = 16, 2, 2, 5
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **{extra: True})
    ours = MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **{extra: True})
    ours.load_state_dict(theirs.state_dict(), strict=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    results = []
    for module in (ours, theirs):
        x = rand(N, L, E, dtype=torch.float64).requires_grad_() if not results else results[0][2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, w = module(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum()
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        results.append((out, w, x, grads))
    (o1, w1, _, g1), (o2, w2, _, g2) = results
    torch.testing.assert_close(o1, o2)
    assert (w1 is None) == (w2 is None)
    if w2 is not None:
        torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(g1, g2)


def test_mha_fully_masked_row_is_zero_where_torch_gives_nan():
    """The deliberate difference: with need_weights=True torch's MultiheadAttention computes the output
    from softmax over the weights, so a query that may see no key gets NaN; fused_attn gives 0 (the
    weights are NaN in both). Every other row is torch's."""
    E, H, L = 16, 2, 4
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    ours = MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = rand(1, L, E)
    blocked = torch.rand(L, L) > 0.6
    blocked[:, 0] = False
    blocked[2] = True  # True = may not attend (MHA's convention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, w_got = ours(x, x, x, attn_mask=blocked)
    want, w_want = theirs(x, x, x, attn_mask=blocked)
    assert torch.isnan(want[:, 2]).all() and torch.all(got[:, 2] == 0)
    assert torch.isnan(w_want[:, 2]).all() and torch.isnan(w_got[:, 2]).all()
    rows = [0, 1, 3]
    torch.testing.assert_close(got[:, rows], want[:, rows])
    torch.testing.assert_close(w_got[:, rows], w_want[:, rows])
