"""Dropout of the attention probabilities (fused_attn/dropout.py): one Philox stream that every
backend draws the same way, seeded from torch's generator. The kernels' keep decisions are read
back exactly (v = identity makes out[i, j] = P[i, j] keep[i, j] / (1 - p)), their results and
gradients are checked against the reference given the same seed, and the statistics of the
stream are checked against 1 - p and the no-dropout output."""
import math

import pytest
import torch

import fused_attn
from fused_attn import dropout
from fused_attn.spec import CausalMode

from attn_cases import check_backend, make_inputs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_philox_known_answers():
    # Random123's published Philox-4x32-10 test vectors (kat_vectors): counter, key -> output.
    zero = torch.zeros((), dtype=torch.int64)
    assert [int(x) for x in dropout.philox(0, zero, zero, zero, zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                          0x9B00DBD8]
    ones = torch.full((), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(x) for x in dropout.philox(0xFFFFFFFFFFFFFFFF, ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    n = 4 * 64 * 257
    keep = dropout.keep_mask(dropout.draw_seed(), p, 2, 2, 64, 257)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # no structure along keys: each of the four outputs of a Philox call keeps 1 - p too
    for t in range(4):
        part = keep[..., t::4]
        assert abs(part.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / part.numel())


def _identity_values(B, Hk, S, dtype):
    """v (B, Hk, S, S) = identity: out[i, j] = the (dropped, scaled) probability of key j."""
    return torch.eye(S, dtype=dtype).expand(B, Hk, S, S)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_keeps_exactly_the_streams_elements(dtype, p):
    B, Hq, Hk, L, S = 2, 4, 2, 37, 70  # 70 keys: two 64-key panels, a key count not a multiple of 4
    q, k, _ = make_inputs(B, Hq, Hk, L, S, 16, 16, dtype)
    v = _identity_values(B, Hk, S, dtype)
    torch.manual_seed(11)
    out = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=True, backend="cpu")
    torch.manual_seed(11)
    keep = dropout.keep_mask(dropout.draw_seed(), p, B, Hq, L, S)
    assert torch.equal(out != 0, keep)
    probs = torch.softmax(q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / 4, -1)
    torch.testing.assert_close(out.double(), probs * keep / (1 - p), rtol=1e-2 if dtype.itemsize == 2 else 1e-5,
                               atol=1e-3 if dtype.itemsize == 2 else 1e-7)


def test_cpu_causal_keeps_the_streams_elements_where_visible():
    B, H, L, S = 1, 3, 50, 90
    q, k, _ = make_inputs(B, H, H, L, S, 32, 32, torch.float32)
    torch.manual_seed(3)
    out = fused_attn.scaled_dot_product_attention(q, k, _identity_values(B, H, S, torch.float32), dropout_p=0.4,
                                                  is_causal=True, backend="cpu")
    torch.manual_seed(3)
    keep = dropout.keep_mask(dropout.draw_seed(), 0.4, B, H, L, S)
    visible = torch.ones(L, S, dtype=torch.bool).tril()
    assert torch.equal(out != 0, keep & visible)


def test_cpu_varlen_keeps_the_streams_elements_at_packed_rows():
    lens_q, lens_k = [5, 0, 17, 9], [12, 7, 0, 70]
    cu_q = torch.tensor([0] + lens_q).cumsum(0)
    cu_k = torch.tensor([0] + lens_k).cumsum(0)
    Tq, Tk, H = sum(lens_q), sum(lens_k), 2
    q, k = torch.randn(Tq, H, 16), torch.randn(Tk, H, 16)
    v = torch.eye(Tk).unsqueeze(1).expand(Tk, H, Tk)
    torch.manual_seed(8)
    out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 17, 70, dropout_p=0.3, backend="cpu")  # (Tq, H, Tk)
    torch.manual_seed(8)
    keep = dropout.keep_mask(dropout.draw_seed(), 0.3, 1, H, Tq, Tk)[0].transpose(0, 1)  # (Tq, H, Tk)
    inside = torch.zeros(Tq, Tk, dtype=torch.bool)
    for b in range(len(lens_q)):
        inside[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = True
    assert torch.equal(out != 0, keep & inside[:, None, :])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [CausalMode.NONE, CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT],
                         ids=["full", "causal", "lower_right"])
@pytest.mark.parametrize("L,S", [(17, 113), (113, 70)])
def test_cpu_matches_reference_with_the_same_seed(dtype, mode, L, S):
    q, k, v = make_inputs(2, 4, 2, L, S, 40, 24, dtype)
    check_backend("cpu", q, k, v, mode, with_lse_grad=True, dropout_p=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", ["window", "bool_mask", "float_mask", "key_padding", "alibi", "softcap"])
def test_cpu_dropout_combines_with_every_feature(dtype, extra):
    B, H, L, S = 2, 4, 67, 131
    q, k, v = make_inputs(B, H, H, L, S, 32, 32, dtype)
    kw = {}
    if extra == "window":
        kw["window"] = (20, 5)
    elif extra == "bool_mask":
        kw["attn_mask"] = torch.rand(B, 1, L, S) > 0.3
    elif extra == "float_mask":
        kw["attn_mask"] = torch.randn(B, H, L, S)
    elif extra == "key_padding":
        kw["attn_mask"] = (torch.arange(S) < torch.tensor([S - 40, S])[:, None])[:, None, None, :]
    elif extra == "alibi":
        kw["alibi_slopes"] = torch.rand(H) * 0.3
    else:
        kw["softcap"] = 3.0
    check_backend("cpu", q, k, v, CausalMode.NONE, dropout_p=0.25, **kw)


def test_cpu_varlen_matches_reference_with_the_same_seed():
    lens_q, lens_k = [5, 0, 40, 9], [12, 7, 0, 100]
    cu_q, cu_k = (torch.tensor([0] + n).cumsum(0) for n in (lens_q, lens_k))
    H, E = 4, 24
    q, k, v = (torch.randn(sum(n), h, E, dtype=torch.float64, requires_grad=True)
               for n, h in ((lens_q, H), (lens_k, 2), (lens_k, 2)))
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(21)
        out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 40, 100, dropout_p=0.35, causal=True,
                                          backend=backend)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                (q, k, v))
        results.append((out, *g))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cpu_same_seed_same_result_and_new_seed_new_mask():
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 2, 33, 47, 16, 16, torch.float32))
    runs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        out = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="cpu")
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])


def test_cpu_dropout_one_gives_zeros_and_zero_grads():
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 2, 9, 14, 8, 8, torch.float32))
    out = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend="cpu")
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v)):
        assert torch.equal(g, torch.zeros_like(g))


def test_mean_over_draws_is_the_output_without_dropout():
    """E[dropout(P) V] = P V: the mean of many draws sits within 5 standard errors of it."""
    q, k, v = make_inputs(1, 2, 2, 16, 40, 8, 8, torch.float64)
    want = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")
    torch.manual_seed(0)
    draws = torch.stack([fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend="cpu")
                         for _ in range(300)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - want).abs() <= 5 * se + 1e-12).all(), ((mean - want).abs() / se).max()
    assert ((draws.mean((0, -1)) - want.mean(-1)).abs() > 0).all()  # draws differ from the expectation


def test_reference_is_reproducible_and_drops():
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(5)
    a = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(5)
    b = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    assert torch.equal(a, b)
    assert not torch.allclose(a, fused_attn.scaled_dot_product_attention(q, k, v, backend="reference"))


def test_automatic_choice_runs_dropout_on_the_cpu_kernels():
    q = torch.randn(1, 2, 8, 16)
    assert fused_attn.explain_dispatch(q, q, q, dropout_p=0.2)["cpu"] is None
