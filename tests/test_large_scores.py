"""fp32 gradients at large scores (issue 12 item 1): no worse than plain fp32 PyTorch's.

The backward rebuilds P from the lse the forward saved. With scores ~ 1e3 an fp32 lse is off by
an ulp of 1e3 (~6e-5), so P at a row's largest score is off by that much relative, and the
gradients were up to 760x worse than plain fp32 PyTorch's. Each point here compares the
gradients' max error against the fp64 reference with plain fp32 PyTorch's max error, without
the tolerance rule's floor (2e-6 times the largest gradient, which hides the effect): at most
testing.ERROR_RATIO. q, k ~ N(0, sigma^2), so the scores grow as sigma^2 * sqrt(E).
The "reference" backend (fp32, naive) is the control.

A second mechanism remains at the largest scores, in every backend that forms
delta = rowsum(dO * O) (FlashAttention's): in a row whose P is one-hot in fp32, the exact
dS = P (dP - delta) at the chosen key is 0, and plain PyTorch gets 0 because it subtracts
sum(P * dP) built from its own dP; a fused kernel subtracts a delta summed in another order than
its dP, so dS is a few ulps of dP, times |k| in dq (and |q| in dk). An emulation in PyTorch
with exact P and delta = rowsum(dO * O) (even summed in fp64) gives the same dq ratios as the
Triton kernel at the DELTA points below (8x at sigma 10, E 256, causal; 34-193x at sigma 30);
sum(P * dP) gives 1.0. Those points are strict xfails until that is fixed (a design question:
delta from the kernels' own dP costs a pass over the keys). The CPU backend cancels dS exactly
at a row's dominant key (79159d5); two of its sigma 30 points remain (CPU_FAILING).

Inputs are drawn from a generator seeded by the grid point (fixed seeds, so the xfail lists are
deterministic); the control, "reference", is plain fp32 PyTorch itself (ratio 1).
"""
import pytest
import torch

import fused_attn
from attn_cases import run_attention
from fused_attn import testing
from fused_attn.ops import triton_attention as T
from fused_attn.spec import CausalMode

INTERPRETER_ONLY = pytest.mark.skipif(not T.INTERPRETED, reason="CPU tensors reach Triton only under its interpreter")
DELTA_REASON = ("delta = rowsum(dO * O) does not cancel dP exactly in rows whose P is one-hot (plain PyTorch's "
                "sum(P * dP) does): dq/dk a few ulps of dP times |k|, |q| where the answer is ~0 (see the module doc)")
CPU_REASON = ("CPU dq/dk at sigma 30 after 79159d5 (exact dS at a row's dominant key): 17-19x plain PyTorch's at "
              "E 128, 3.1-3.2x at E 256 (full attention; measured here)")
# (sigma, E, causal) points above ERROR_RATIO: Triton's, the delta mechanism; the CPU's (its
# backward cancels dS exactly at a row's dominant key since 79159d5), what is left of it.
DELTA = {(10.0, 256, True), (30.0, 64, True), (30.0, 128, False), (30.0, 256, False), (30.0, 256, True)}
CPU_FAILING = {(30.0, 128, False), (30.0, 256, False)}
L, S = 48, 40


def _backends():
    return [pytest.param("triton", marks=INTERPRETER_ONLY), "reference", "cpu"]


def _points():
    for backend in _backends():
        name = backend if isinstance(backend, str) else backend.values[0]
        marks = list(getattr(backend, "marks", ()))
        for sigma in (4.0, 10.0, 30.0):
            for E in (32, 64, 128, 256):
                for causal in (False, True):
                    point = (sigma, E, causal)
                    reason = (DELTA_REASON if name == "triton" and point in DELTA else
                              CPU_REASON if name == "cpu" and point in CPU_FAILING else None)
                    point_marks = marks + ([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])
                    yield pytest.param(name, sigma, E, causal, marks=point_marks,
                                       id=f"{name}-sigma{sigma:g}-E{E}-{'causal' if causal else 'full'}")


def _randn(shape, std, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def gradient_ratios(backend, q, k, v, mode: CausalMode, scale=None) -> dict:
    """Max error of ``backend``'s dq, dk, dv against the fp64 reference over plain fp32 PyTorch's."""
    kw = dict(scale=scale, enable_gqa=False, is_causal=mode is CausalMode.UPPER_LEFT)
    got, ref, base = (run_attention(b, q, k, v, mode, kw, True, False, 0, compute_dtype=dt)
                      for b, dt in ((backend, None), (None, torch.float64), (None, None)))
    return {n: ((got[n] - ref[n]).abs().max() / (base[n] - ref[n]).abs().max()).item() for n in ("dq", "dk", "dv")}


@pytest.mark.parametrize("backend,sigma,E,causal", list(_points()))
def test_fp32_gradients_no_worse_than_pytorch(backend, sigma, E, causal):
    seed = 1000 * int(sigma) + E + causal
    q, k = _randn((1, 1, L, E), sigma, seed), _randn((1, 1, S, E), sigma, seed + 1)
    v = _randn((1, 1, S, E), 1.0, seed + 2)
    ratios = gradient_ratios(backend, q, k, v, CausalMode.UPPER_LEFT if causal else CausalMode.NONE)
    assert max(ratios.values()) <= testing.ERROR_RATIO, ratios


@pytest.mark.parametrize("key", [1e4, 1e6], ids=str)
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=INTERPRETER_ONLY), "reference", "cpu"])
def test_single_key_gradients_are_exact(backend, key):
    """One key with a score of 1e4 or 1e6: P = 1, so dv = dout = 1 and dS = P (dP - delta) = 0 exactly."""
    q, k = torch.ones(1, 1, 1, 1, requires_grad=True), torch.full((1, 1, 1, 1), key, requires_grad=True)
    v = torch.ones(1, 1, 1, 1, requires_grad=True)
    out = fused_attn.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend)
    out.sum().backward()
    assert out.item() == 1.0 and v.grad.item() == 1.0 and q.grad.item() == 0.0 and k.grad.item() == 0.0


def _dominant_key(backend):
    """Scores 1e4 above the rest in every row (P one-hot in fp32): out, dq, dk, dv and the exact dv."""
    E = 16
    q = torch.ones(1, 2, 5, E)
    k = _randn((1, 2, 7, E), 0.01, 7)
    k[:, :, 3] = 1e4 / E  # every row's score on key 3 is 1e4
    v = _randn((1, 2, 7, E), 1.0, 8)
    dout = torch.randint(-8, 9, (1, 2, 5, E), generator=torch.Generator().manual_seed(9)).float()  # exact sums
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = fused_attn.scaled_dot_product_attention(*leaves, scale=1.0, backend=backend)
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), leaves)
    want_dv = torch.zeros_like(v)
    want_dv[:, :, 3] = dout.sum(2)
    assert torch.equal(out, v[:, :, 3:4].expand(-1, -1, 5, -1).detach())
    return dq, dk, dv, want_dv


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=INTERPRETER_ONLY), "reference", "cpu"])
def test_dominant_key_dv_is_exact(backend):
    """P is one-hot in fp32, so dv is dout's column sums on the dominant key and 0 elsewhere, exactly."""
    _, _, dv, want_dv = _dominant_key(backend)
    assert torch.equal(dv, want_dv)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=[INTERPRETER_ONLY, pytest.mark.xfail(
    strict=True, reason=DELTA_REASON)]), "reference", "cpu"])
def test_dominant_key_dq_dk_are_zero(backend):
    """The same one-hot P: dS = P (dP - delta) is 0 exactly, so are dq and dk (plain PyTorch: 0).
    The delta mechanism's minimal reproducer: Triton's dq is 1.2e-3 (k = 625); the CPU's was 2.4e-3
    before 79159d5."""
    dq, dk, _, _ = _dominant_key(backend)
    assert torch.all(dq == 0) and torch.all(dk == 0)


@INTERPRETER_ONLY
def test_triton_saves_fp64_lse_for_fp32_and_returns_fp32():
    """The Triton forward op saves lse in fp64 for fp32 inputs (fp32 for 16-bit ones), its fake
    says so too, and the public lse is fp32; a row that sees no key keeps lse -inf, P 0 and
    zero gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for dtype, saved in ((torch.float32, torch.float64), (torch.float16, torch.float32)):
        q, k, v = (torch.randn(1, 2, n, 16).to(dtype) for n in (6, 4, 4))
        causal = int(CausalMode.LOWER_RIGHT)
        _, lse = torch.ops.fused_attn.triton_fwd(q, k, v, causal, 0.25)
        with FakeTensorMode() as mode:
            _, fake_lse = torch.ops.fused_attn.triton_fwd(*(mode.from_tensor(t) for t in (q, k, v)), causal, 0.25)
        assert lse.dtype == fake_lse.dtype == saved
        assert torch.all(torch.isneginf(lse[:, :, :2])) and torch.isfinite(lse[:, :, 2:]).all()
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out, public = fused_attn.attention_with_lse(
            *leaves, attn_mask=torch.nn.attention.bias.causal_lower_right(6, 4), backend="triton")
        assert public.dtype == torch.float32
        assert torch.equal(public[:, :, 2:], lse[:, :, 2:].float())
        dq, dk, dv = torch.autograd.grad((out.float() ** 2).sum() + public[:, :, 2:].sum(), leaves)
        assert torch.all(dq[:, :, :2] == 0) and all(torch.isfinite(g).all() for g in (dq, dk, dv))
