"""The CUDA forward kernel (csrc/cuda/flash_fwd_kernel.cuh), emulated on the CPU or compiled on a GPU.

By default the same kernel source nvcc compiles runs here as C++ with every global access
bounds-checked (fused_attn/ops/_emu.py, FUSED_ATTN_CUDA_EMULATE=1, CPU tensors). With
FUSED_ATTN_TEST_DEVICE=cuda (tests/conftest.py) the same cases run on CUDA tensors through
the built extension fused_attn._C_cuda, with the same assertions; the few emulator-only
tests are skipped there. Results go through the public API with backend "cuda" (forward only: out and lse; the
gradients are tests/test_cuda_emu_backward.py's) on the cuda subset of the one case grid
(tests/attn_cases.py), and are checked against the fp64 reference under the one tolerance
rule (attn_cases.check_backend: at most 2x plain PyTorch's error in the same dtype).
Outputs are NaN-poisoned first, so a missed write fails.
"""
import math

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fused_attn
from fused_attn import dispatch
from fused_attn.ops import _emu
from fused_attn.problem import make_problem
from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close

from attn_cases import CAUSAL_MODES, check_backend, grid, make_inputs, mode_id, run_attention, sdpa_causal_args
from conftest import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:Lower right causal bias"),
              pytest.mark.usefixtures("cuda_emulation")]

DTYPES = [torch.float16, torch.bfloat16]


emulator_only = pytest.mark.skipif(DEVICE != "cpu", reason="tests the CPU emulator itself")



def _inputs(*shape, **kw):
    return make_inputs(*shape, device=DEVICE, **kw)


def check_forward(q, k, v, mode: CausalMode, scale=None):
    """out and lse of backend "cuda" vs. the fp64 reference (attn_cases.check_backend, forward only)."""
    check_backend("cuda", q, k, v, mode, scale=scale, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", grid("seqlens", "cuda"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_seqlens_causal_dtypes(mode, L, S, dtype):
    check_forward(*_inputs(2, 2, 2, L, S, 40, 40, dtype), mode)


# Every head-dim bucket (32 ... 256), a dim inside a bucket (72 -> 96), one that is not a
# multiple of 8 (111: zero-padded to 112 -> bucket 128), and E != Ev.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", grid("head_dims", "cuda"))
def test_head_dims(E, Ev, dtype):
    check_forward(*_inputs(1, 2, 2, 97, 203, E, Ev, dtype), CausalMode.LOWER_RIGHT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hk", grid("gqa", "cuda"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_gqa(mode, Hk, dtype):
    check_forward(*_inputs(2, 6, Hk, 113, 150, 64, 64, dtype), mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(dtype):
    q, k, v = _inputs(2, 3, 3, 113, 203, 72, 72, dtype, layout="mixed")
    assert not q.is_contiguous() and k.stride(-1) != 1 and v.stride(1) == 0
    check_forward(q, k, v, CausalMode.UPPER_LEFT)


@pytest.mark.parametrize("scale", [0.0, -0.3, 2.5])
def test_unusual_scales(scale):
    """Masking happens after scaling: a negative scale must not turn -inf into +inf."""
    check_forward(*_inputs(1, 2, 2, 70, 90, 64, 64, torch.float16), CausalMode.UPPER_LEFT, scale=scale)


def test_rows_that_see_no_key():
    """Lower-right causal with L > S: the first L - S rows see nothing: zeros and lse = -inf."""
    q, k, v = _inputs(1, 2, 2, 203, 64, 40, 40, torch.float16)
    out, lse = fused_attn.attention_with_lse(q, k, v, attn_mask=causal_lower_right(203, 64), backend="cuda")
    assert torch.equal(out[:, :, :139], torch.zeros_like(out[:, :, :139]))
    assert torch.isneginf(lse[:, :, :139]).all() and torch.isfinite(lse[:, :, 139:]).all()


def test_sdpa_entry_point_and_3d_inputs():
    q, k, v = (torch.randn(4, 33, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    got = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    base = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(got, ref, base)


# ---- dispatch ----------------------------------------------------------------------------

def _problem(dtype=torch.float16, requires_grad=False):
    q, k, v = _inputs(1, 2, 2, 16, 16, 32, 32, dtype)
    if requires_grad:
        q.requires_grad_()
    return make_problem(q, k, v)


def test_refusals_say_why():
    assert dispatch.get("cuda").refusal(_problem(), explicit=True) is None
    assert "not supported (float16, bfloat16)" in dispatch.get("cuda").refusal(_problem(torch.float32), explicit=True)
    assert dispatch.get("cuda").refusal(_problem(requires_grad=True), explicit=True) is None  # training: tests/test_cuda_emu_backward.py


@emulator_only
def test_emulator_runs_only_by_name(monkeypatch):
    assert "asked for by name" in dispatch.get("cuda").refusal(_problem(), explicit=False)
    monkeypatch.delenv("FUSED_ATTN_CUDA_EMULATE")
    assert "FUSED_ATTN_CUDA_EMULATE=1" in dispatch.get("cuda").refusal(_problem(), explicit=True)


@emulator_only
def test_emulator_speed_is_reported(capsys):
    """Not a benchmark: prints the emulator's throughput at a test shape for the record."""
    q, k, v = _inputs(1, 4, 4, 256, 256, 128, 128, torch.float16)
    fused_attn.attention_with_lse(q, k, v, backend="cuda")
    seconds, blocks, threads, switches = _emu.load().last_launch_stats()
    flops = 4 * 4 * 256 * 256 * 128
    with capsys.disabled():
        print(f"\nemulated flash_fwd (1, 4, 256, 256, d=128) fp16: {seconds * 1e3:.0f} ms, {blocks} blocks, "
              f"{switches} fiber switches, {flops / seconds / 1e9:.2f} GFLOP/s emulated")
    assert blocks == 4 * math.ceil(256 / 128)


# ---- the grid: (tiles, heads, batch) -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_covers_every_tile_head_and_batch(dtype):
    """2 query tiles x 4 heads x 3 batches (GQA 4:2): each block computes its own slice; one
    that reads the wrong coordinates writes the wrong slice or leaves a poisoned one."""
    check_forward(*_inputs(3, 4, 2, 130, 20, 32, 32, dtype), CausalMode.NONE)
    if DEVICE == "cpu":
        assert _emu.load().last_launch_stats()[1] == 2 * 4 * 3  # blocks launched


# ---- NaN in, NaN out (torch's math path; the fp64 reference on the same 16-bit values) ----

SPECIAL = {"nan_q": ("q", float("nan")), "inf_q": ("q", float("inf")), "nan_k": ("k", float("nan")),
           "ninf_k": ("k", float("-inf")), "nan_v": ("v", float("nan")), "inf_v": ("v", float("inf"))}


def special_inputs(what, mode, dtype, L=37, S=45):
    """Random q, k, v (1, 2 heads) with one NaN / inf: in q at row 5 of head 1, in k or v at key 0
    of head 0, which every row sees (L <= S), so the reference's dense P V does not spread it
    to rows a causal kernel skips."""
    q, k, v = _inputs(1, 2, 2, L, S, 32, 32, dtype)
    name, value = SPECIAL[what]
    t, idx = {"q": (q, (0, 1, 5, 3)), "k": (k, (0, 0, 0, 3)), "v": (v, (0, 0, 0, 3))}[name]
    t[idx] = value
    return q, k, v


def same_placement(name, got, want):
    """NaN, +inf and -inf at exactly the same elements."""
    for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        g, w = f(got), f(want)
        assert torch.equal(g, w), (f"{name}: {kind} at {int(g.sum())} elements, the reference has {int(w.sum())}; "
                                   f"first differences at {(g != w).nonzero()[:4].tolist()}")


def reference_with_nan_lse(ref):
    """The reference's lse of a row whose scores hold a NaN is -inf (its 'saw a key' test is
    denominator > 0); torch's logsumexp, and the contract, say NaN: such rows are those whose
    output is NaN with lse -inf."""
    nan_rows = torch.isnan(ref["out"]).any(-1) & torch.isneginf(ref["lse"])
    return dict(ref, lse=torch.where(nan_rows, float("nan"), ref["lse"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
@pytest.mark.parametrize("what", list(SPECIAL))
def test_nan_inf_placement_forward(what, mode, dtype):
    q, k, v = special_inputs(what, mode, dtype)
    kw = dict(**sdpa_causal_args(mode, q.shape[2], k.shape[2]))
    got = run_attention("cuda", q, k, v, mode, kw, False, False, 0)
    ref = reference_with_nan_lse(run_attention(None, q, k, v, mode, kw, False, False, 0, compute_dtype=torch.float64))
    assert not torch.isfinite(ref["out"]).all()  # the special value reaches the output
    for name in ("out", "lse"):
        same_placement(name, got[name], ref[name].to(got[name].dtype))
        keep = torch.isfinite(ref[name])
        assert torch.allclose(got[name][keep].double(), ref[name][keep], atol=2e-2, rtol=2e-2), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_see_no_key_ignore_nan_and_inf_in_v(dtype):
    """Lower-right causal with L > S: rows 0 .. L - S - 1 see no key and output 0 (lse -inf)
    however v holds a NaN and an inf; the rows that see those keys get them."""
    q, k, v = _inputs(1, 2, 2, 70, 20, 32, 32, dtype)
    v[0, 0, 0, 3], v[0, 1, 19, 4] = float("nan"), float("inf")
    out, lse = fused_attn.attention_with_lse(q, k, v, attn_mask=causal_lower_right(70, 20), backend="cuda")
    assert torch.equal(out[:, :, :50], torch.zeros_like(out[:, :, :50])) and torch.isneginf(lse[:, :, :50]).all()
    assert torch.isnan(out[0, 0, 50:, 3]).all() and torch.isposinf(out[0, 1, 69, 4])
    assert torch.isfinite(lse[:, :, 50:]).all()
