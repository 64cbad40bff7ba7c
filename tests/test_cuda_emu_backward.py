"""The CUDA backward kernels (csrc/cuda/flash_bwd_kernel.cuh), emulated on the CPU or compiled on a GPU.

Gradients go through autograd and the public API with backend "cuda" (forward and backward
both on the CUDA kernels), on the cuda subset of the one case grid (tests/attn_cases.py),
and are checked against the fp64 reference under the one tolerance rule
(tests/attn_cases.check_backend: out, lse, dq, dk, dv at most 2x plain PyTorch's error in
the same dtype). Gradient outputs are NaN-poisoned first, so a missed write fails. By
default the kernels run on CPU tensors through the emulator (FUSED_ATTN_CUDA_EMULATE=1),
which checks every global access against its tensor's bounds in every test here (GPtr has
no unchecked mode under emulation; tests/test_cuda_emu_primitives.py shows the checker
firing). With FUSED_ATTN_TEST_DEVICE=cuda (tests/conftest.py) the same cases run on CUDA
tensors through the built extension fused_attn._C_cuda; the emulator-only tests are
skipped there.
"""
import math

import pytest
import torch

import fused_attn
from fused_attn import dispatch, reference
from fused_attn.ops import _emu
from fused_attn.ops import cuda
from fused_attn.problem import make_problem
from fused_attn.spec import CausalMode

from attn_cases import CAUSAL_MODES, check_backend, grid, make_inputs, mode_id, run_attention, sdpa_causal_args
from conftest import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:Lower right causal bias"),
              pytest.mark.usefixtures("cuda_emulation")]

DTYPES = [torch.float16, torch.bfloat16]


emulator_only = pytest.mark.skipif(DEVICE != "cpu", reason="tests the CPU emulator itself")



def _inputs(*shape, **kw):
    return make_inputs(*shape, device=DEVICE, **kw)


def _raw_backward(*args):
    """The binding's backward entry point with no Python launcher around it: the emulator's
    flash_bwd on CPU tensors, torch.ops.fused_attn.cuda_bwd_out on CUDA tensors."""
    if DEVICE == "cpu":
        return _emu.load().flash_bwd(*args)
    return torch.ops.fused_attn.cuda_bwd_out(*args, torch.cuda.current_stream().cuda_stream)


# Ragged tails on both sides, L > S (lower-right: rows that see no key) and L < S; the lse
# gradient enters through delta - dlse.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", grid("seqlens", "cuda"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_seqlens_causal_dtypes(mode, L, S, dtype):
    check_backend("cuda", *_inputs(2, 2, 2, L, S, 40, 40, dtype), mode, with_lse_grad=True)


# Every head-dim bucket (32 ... 256), a dim inside a bucket (72 -> 96), one that is not a
# multiple of 8 (111: zero-padded to 112 -> bucket 128), and E != Ev both ways.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", grid("head_dims", "cuda"))
def test_head_dims(E, Ev, dtype):
    check_backend("cuda", *_inputs(1, 2, 2, 97, 203, E, Ev, dtype), CausalMode.LOWER_RIGHT)


# dK/dV sum over the q heads of each kv head's group inside the kernel (no atomics).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hk", grid("gqa", "cuda"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_gqa(mode, Hk, dtype):
    check_backend("cuda", *_inputs(1, 6, Hk, 113, 150, 64, 64, dtype), mode, with_lse_grad=Hk == 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", grid("layouts", "cuda"))
def test_strided_inputs(layout, dtype):
    """(B, L, H, E) views, column slices of a wider tensor, stride-0 batch for k and v."""
    check_backend("cuda", *_inputs(2, 4, 2, 70, 133, 72, 72, dtype, layout=layout), CausalMode.UPPER_LEFT)


@pytest.mark.parametrize("scale", [0.0, -0.3, 2.5])
def test_unusual_scales(scale):
    check_backend("cuda", *_inputs(1, 2, 2, 70, 90, 64, 64, torch.float16), CausalMode.UPPER_LEFT, scale=scale)


def _grads(q, k, v, mode, dout, dlse=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    L, S = q.shape[2], k.shape[2]
    out, lse = fused_attn.attention_with_lse(q, k, v, enable_gqa=True, backend="cuda", **sdpa_causal_args(mode, L, S))
    loss = (out.float() * dout).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * dlse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def test_rows_that_see_no_key_get_zero_gradients():
    """Lower-right causal with L > S: the first L - S rows see nothing (lse = -inf); their dq
    is exactly 0 even with an lse gradient, and they add nothing to dk and dv."""
    q, k, v = _inputs(1, 2, 2, 203, 64, 40, 40, torch.float16)
    dout, dlse = torch.randn(1, 2, 203, 40, device=DEVICE), torch.randn(1, 2, 203, device=DEVICE)
    dq, dk, dv = _grads(q, k, v, CausalMode.LOWER_RIGHT, dout, dlse)
    assert torch.equal(dq[:, :, :139], torch.zeros_like(dq[:, :, :139]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    q2 = q.clone()
    q2[:, :, :139] = torch.randn_like(q2[:, :, :139])  # rows that see nothing cannot matter
    dout2 = dout.clone()
    dout2[:, :, :139] = 7.0
    _, dk2, dv2 = _grads(q2, k, v, CausalMode.LOWER_RIGHT, dout2, dlse)
    assert torch.equal(dk, dk2) and torch.equal(dv, dv2)


@pytest.mark.parametrize("mode", [CausalMode.NONE, CausalMode.LOWER_RIGHT], ids=mode_id)
def test_deterministic(mode):
    """No atomics: repeated backward passes give bitwise-equal gradients, whatever order the
    emulator's worker threads run the blocks in."""
    q, k, v = _inputs(1, 4, 2, 150, 97, 64, 64, torch.bfloat16)
    dout, dlse = torch.randn(1, 4, 150, 64, device=DEVICE), torch.randn(1, 4, 150, device=DEVICE)
    first = _grads(q, k, v, mode, dout, dlse)
    for _ in range(2):
        again = _grads(q, k, v, mode, dout, dlse)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_writes_stay_inside_the_gradient_views():
    """dq, dk, dv given as column slices of wider sentinel-filled buffers: the kernels write
    exactly the slice (every element of it, and nothing in the columns beside it)."""
    B, H, L, S, E = 1, 2, 45, 77, 40
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float16)
    out, lse = cuda.forward(q, k, v, 1, 0.125)
    dout = torch.randn_like(out)
    bufs = [torch.full((B, H, n, E + 8), 1234.0, dtype=torch.float16, device=DEVICE) for n in (L, S, S)]
    dq, dk, dv = (b[..., :E] for b in bufs)
    for t in (dq, dk, dv):
        t.fill_(float("nan"))
    delta = torch.empty(B, H, L, device=DEVICE)
    _raw_backward(dout, None, q, k, v, out, lse, dq, dk, dv, delta, 1, 0.125)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert all((b[..., E:] == 1234.0).all() for b in bufs)
    ref = cuda.backward(dout, None, q, k, v, out, lse, 1, 0.125)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), ref))


def test_bad_inputs_say_what_was_passed():
    q, k, v = _inputs(1, 2, 2, 16, 16, 32, 32, torch.float16)
    out, lse = cuda.forward(q, k, v, 0, 1.0)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    with pytest.raises(RuntimeError, match=r"dk must match .* got \[1, 2, 15, 32\]"):
        _raw_backward(out, None, q, k, v, out, lse, dq, dk[:, :, :15], dv, torch.empty(1, 2, 16, device=DEVICE), 0, 1.0)
    with pytest.raises(RuntimeError, match="dlse must be a contiguous float32"):
        _raw_backward(out, lse.double(), q, k, v, out, lse, dq, dk, dv, torch.empty(1, 2, 16, device=DEVICE), 0, 1.0)


def test_training_is_allowed_through_cuda():
    q, k, v = _inputs(1, 2, 2, 16, 16, 32, 32, torch.float16)
    q.requires_grad_()
    assert dispatch.get("cuda").refusal(make_problem(q, k, v), explicit=True) is None
    out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@emulator_only
def test_emulator_speed_is_reported(capsys):
    """Not a benchmark: prints the emulated backward's throughput at a test shape for the record."""
    q, k, v = _inputs(1, 4, 4, 256, 256, 128, 128, torch.float16)
    out, lse = cuda.forward(q, k, v, 0, 128 ** -0.5)
    cuda.backward(torch.randn_like(out), None, q, k, v, out, lse, 0, 128 ** -0.5)
    seconds, blocks, threads, switches = _emu.load().last_launch_stats()
    flops = 2.5 * 4 * 4 * 256 * 256 * 128
    with capsys.disabled():
        print(f"\nemulated flash_bwd dK/dV + dQ (1, 4, 256, 256, d=128) fp16: {seconds * 1e3:.0f} ms, {blocks} blocks, "
              f"{switches} fiber switches, {flops / seconds / 1e9:.2f} GFLOP/s emulated")
    assert blocks == 4 * math.ceil(256 / 64) + 4 * math.ceil(256 / 128)


@pytest.mark.parametrize("with_dlse", [False, True])
def test_backward_op_schema_and_fake(with_dlse):
    """fused_attn::cuda_bwd is a well-formed torch.library op (schema, fake implementation)."""
    q, k, v = _inputs(1, 2, 1, 33, 47, 40, 40, torch.float16)
    out, lse = cuda.forward(q, k, v, 2, 0.2)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(cuda.backward, (torch.randn_like(out), dlse, q, k, v, out, lse, 2, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the grid: (tiles, heads, batch) -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_covers_every_tile_head_and_batch(dtype):
    """The three backward kernels over several tiles (query rows / 4 in the preprocess, key and
    query blocks), 4 q heads on 2 kv heads, 3 batches: a block that reads the wrong coordinates
    writes another slice or leaves a poisoned one."""
    check_backend("cuda", *_inputs(3, 4, 2, 70, 130, 32, 32, dtype), CausalMode.NONE, with_lse_grad=True)


# ---- NaN in, NaN out (see tests/test_cuda_emu_forward.py for the inputs) -------------------

SPECIAL_CASES = [(w, m) for w in ("nan_q", "inf_q", "nan_k", "ninf_k", "nan_v", "inf_v") for m in CAUSAL_MODES
                 if m is CausalMode.NONE or not w.endswith("_q")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("what,mode", SPECIAL_CASES, ids=lambda x: getattr(x, "name", x))
def test_nan_inf_placement_backward(what, mode, dtype):
    """dq, dk, dv of sum(out * dout): NaN / +-inf at exactly the elements where the fp64
    reference (autograd through fused_attn.reference on the same 16-bit values) has them, but
    a pair the causal mask hides contributes nothing: the keys no row sees get dk = dv = 0
    (the dense reference's P of a NaN row is NaN at its hidden keys too). A NaN / inf query
    under a causal mask is left out: 0 * NaN at its hidden pairs reaches dk in the dense
    reference and in the tiles a kernel visits, not in those it skips."""
    from test_cuda_emu_forward import same_placement, special_inputs

    q, k, v = special_inputs(what, mode, dtype)
    L, S = q.shape[2], k.shape[2]
    kw = dict(**sdpa_causal_args(mode, L, S))
    got = run_attention("cuda", q, k, v, mode, kw, True, False, 1)
    ref = run_attention(None, q, k, v, mode, kw, True, False, 1, compute_dtype=torch.float64)
    allowed = reference.causal_mask(L, S, mode)
    if allowed is not None:
        unseen = ~allowed.any(0)
        assert unseen.any() or mode is CausalMode.LOWER_RIGHT  # upper-left with L < S: keys no row sees
        for name in ("dk", "dv"):
            ref[name][..., unseen, :] = 0
            assert torch.equal(got[name][..., unseen, :], torch.zeros_like(got[name][..., unseen, :])), name
    for name in ("dq", "dk", "dv"):
        same_placement(name, got[name], ref[name].to(got[name].dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_see_no_key_get_zero_gradients_despite_nan_in_v(dtype):
    """Lower-right causal with L > S: dq of the rows that see no key is 0 even with a NaN in v
    (their dS = P (dP - delta) would be 0 * NaN); the rows that see it get NaN."""
    q, k, v = _inputs(1, 2, 2, 70, 20, 32, 32, dtype)
    v[0, 0, 0, 3] = float("nan")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fused_attn.scaled_dot_product_attention(q, k, v, **sdpa_causal_args(CausalMode.LOWER_RIGHT, 70, 20),
                                                  backend="cuda")
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert torch.equal(dq[:, :, :50], torch.zeros_like(dq[:, :, :50]))
    assert torch.isnan(dq[0, 0, 50:]).all() and torch.isfinite(dq[0, 1]).all()
    assert torch.isfinite(dv).all()  # dV = P^T dO does not read v
