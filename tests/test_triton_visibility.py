"""Sliding windows, per-batch key bounds and mask tensors inside the Triton kernels (interpreter),
forward and backward, against the fp64 reference under the tolerance rule (attn_cases.check_backend):
out, lse, dq, dk, dv; with causal (both alignments), GQA and the lse gradient. Then that tiles no
row sees, and tiles a mask tensor hides entirely, are skipped, not computed and masked: by counting
the tiles each kernel's loops visit, and by NaN keys (and queries) in such tiles, which a masked
visit would spread (0 * NaN in P V and dS K).

Key bounds reach the kernels from a boolean key-padding mask (B, 1, 1, S) that make_problem turns
into Problem.key_bounds (checked), other masks as Problem.mask (checked). Lower-right causal with
key bounds has no public spelling (one attn_mask): window=(-1, 0), which make_problem turns into
lower-right causal (checked), or a window whose right edge is 0 (the same keys).
"""
import inspect

import pytest
import torch

import fused_attn
from fused_attn.ops import triton_attention as T
from fused_attn.problem import make_problem
from fused_attn.spec import AttnSpec, CausalMode, visible_keys
from fused_attn.testing import assert_close, stores_bf16_by_truncation

from attn_cases import (MASK_GRAD_INTERPRETED, check_backend, check_mask_gradient, make_inputs, mode_id,
                        run_attention)

pytestmark = pytest.mark.skipif(not T.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")

NONE, UL, LR = CausalMode.NONE, CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


def _padding_mask(bounds, S, device):
    """Boolean (B, 1, 1, S) mask admitting keys [begin, end) of each batch: one run, so make_problem
    turns it into key bounds."""
    j = torch.arange(S, device=device)
    kb = torch.tensor(bounds, dtype=torch.int64, device=device)
    return ((j >= kb[:, :1]) & (j < kb[:, 1:]))[:, None, None, :]


def check(q, k, v, mode=NONE, window=(-1, -1), bounds=None, mask=None, lse_grad=False, alibi=None, softcap=0.0):
    """attn_cases.check_backend for the Triton backend, with key ``bounds`` (per batch, as a padding
    mask) or a ``mask`` tensor, ALiBi slopes ``alibi`` (B, Hq) and ``softcap``; checks that make_problem
    hands the kernels what the case means to test (key bounds, a mask tensor, lower-right causal for
    window (-1, 0)). Returns the max error ratios."""
    attn_mask = mask if bounds is None else _padding_mask(bounds, k.shape[-2], q.device)
    if attn_mask is not None or window == (-1, 0):
        p = make_problem(q, k, v, attn_mask=attn_mask, is_causal=mode is UL, window=window,
                         enable_gqa=q.shape[1] != k.shape[1])
        assert (p.key_bounds is not None) == (bounds is not None), "not the kernels' key bounds"
        assert (p.mask is not None) == (mask is not None), "the mask did not reach the kernels as a mask"
        assert window != (-1, 0) or p.spec.causal is LR
    return check_backend("triton", q, k, v, mode, with_lse_grad=lse_grad, window=window, attn_mask=attn_mask,
                         alibi_slopes=alibi, softcap=softcap)


def check_clean(q, k, v, dirty, window=(-1, -1), attn_mask=None, lse_grad=False):
    """check_backend's comparison with the kernels run on ``dirty`` (q, k, v holding NaN where no
    (query, key) pair is visible) and the references on the clean q, k, v."""
    kwargs = dict(enable_gqa=q.shape[1] != k.shape[1], window=window, attn_mask=attn_mask)
    seed = int(torch.randint(2 ** 31, ()))
    got = run_attention("triton", *dirty, NONE, kwargs, True, lse_grad, seed)
    ref = run_attention(None, q, k, v, NONE, kwargs, True, lse_grad, seed, compute_dtype=torch.float64)
    base = run_attention(None, q, k, v, NONE, kwargs, True, lse_grad, seed)
    truncated = stores_bf16_by_truncation("triton", q.dtype)
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name == "lse":
            assert_close(got[name], ref[name], base[name], name, dtype=q.dtype)
        else:
            assert_close(got[name], ref[name], base[name], name, truncated_bf16=truncated)


def _inputs(L, S, dtype, device, Hq=2, Hk=1, E=16, B=2):
    return make_inputs(B, Hq, Hk, L, S, E, E, dtype, device)


# (window, L, S): both sides, one side each way, a window of one key (0, 0), one wider than S on the
# left, and single rows and keys; L > S and L < S over several ragged blocks.
WINDOWS = [((0, 0), 64, 64), ((5, -1), 113, 203), ((-1, 3), 203, 97), ((16, 16), 17, 64),
           ((300, 2), 113, 203), ((2, 0), 1, 1), ((0, 40), 203, 97)]


# Every case in fp32; bf16 on the first three (the interpreter is slow: CI time).
@pytest.mark.parametrize("dtype,window,L,S", [(FP32, *w) for w in WINDOWS] + [(BF16, *w) for w in WINDOWS[:3]],
                         ids=[f"{d}-w{w[0]}_{w[1]}-L{L}-S{S}" for d, (w, L, S) in
                              [("fp32", w) for w in WINDOWS] + [("bf16", w) for w in WINDOWS[:3]]])
def test_window(device, dtype, window, L, S):
    check(*_inputs(L, S, dtype, device), window=window, lse_grad=dtype == FP32)


# window and causal intersect; the window is aligned bottom-right whatever the causal alignment
WINDOW_CAUSAL = [(UL, (16, 0), 203, 97), (UL, (40, 8), 64, 64), (LR, (7, 5), 113, 203), (LR, (20, -1), 203, 97)]


@pytest.mark.parametrize("dtype,mode,window,L,S", [(FP32, *c) for c in WINDOW_CAUSAL] + [(BF16, *WINDOW_CAUSAL[2])],
                         ids=[f"fp32-{mode_id(m)}-w{w[0]}_{w[1]}-L{L}-S{S}" for m, w, L, S in WINDOW_CAUSAL]
                         + ["bf16-lower_right-w7_5-L113-S203"])
def test_window_and_causal(device, dtype, mode, window, L, S):
    check(*_inputs(L, S, dtype, device), mode, window=window)


# per-batch key bounds: an empty range and the full one; a range starting and ending inside a block
# (blocks of 32 under the interpreter); left padding; a single key
KEY_BOUNDS = {  # of S: the bounds of batches 0 and 1
    "empty-full": lambda S: ((0, 0), (0, S)),
    "mid_block": lambda S: ((5, S - 7), (37, 150)),
    "left_pad-one_key": lambda S: ((S - 20, S), (40, 41)),
}


@pytest.mark.parametrize("dtype,name", [(FP32, name) for name in KEY_BOUNDS] + [(BF16, "left_pad-one_key"),
                                                                              (FP16, "mid_block")],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_key_bounds(device, dtype, name):
    L, S = 113, 203
    check(*_inputs(L, S, dtype, device), bounds=KEY_BOUNDS[name](S), lse_grad=dtype == FP32)


# window (-1, 0) is lower-right causal (CAUSAL with key bounds); (64, 0) lower-right causal within a window
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("mode,window,L,S,bounds", [
    (UL, (30, 4), 203, 97, ((10, 90), (0, 0))),
    (NONE, (-1, 0), 113, 203, ((5, 196), (60, 203))),
    (NONE, (64, 0), 17, 64, ((0, 33), (31, 64))),
], ids=["upper_left-w30_4-L203-S97", "lower_right-L113-S203", "lower_right-w64_0-L17-S64"])
def test_key_bounds_causal_window(device, dtype, mode, window, L, S, bounds):
    check(*_inputs(L, S, dtype, device), mode, window=window, bounds=bounds, lse_grad=dtype == FP32)


@pytest.mark.parametrize("Hk", [1, 3], ids=["mqa_6to1", "gqa_6to3"])
def test_gqa(device, Hk):
    """dK/dV sum over each kv head's group of query heads under a window and key bounds."""
    q, k, v = _inputs(113, 203, FP16, device, Hq=6, Hk=Hk, E=32)
    check(q, k, v, window=(24, 0), bounds=((3, 190), (50, 120)))


def test_fp16_window_causal(device):
    check(*_inputs(203, 97, FP16, device, E=32), UL, window=(12, 12))


# ---- mask tensors ------------------------------------------------------------------------------

def _hidden(shape, fraction, device):
    return torch.rand(shape, device=device) < fraction


def _bool_random(B, H, L, S, dtype, device):
    """(B, 1, L, S), ~30% hidden, broadcast over heads; row 5 sees nothing."""
    mask = ~_hidden((B, 1, L, S), 0.3, device)
    mask[:, :, 5] = False
    return mask


def _bool_blocks(B, H, L, S, dtype, device):
    """(B, 1, L, S) with whole 32 x 32 tiles hidden (keys 64-95 for every row; rows 32-63 entirely),
    whole tiles admitted (rows 64-95 x keys 0-63), random elsewhere: skipped tiles, the unmasked
    path and masked ones (blocks of 32 under the interpreter)."""
    mask = ~_hidden((B, 1, L, S), 0.3, device)
    mask[..., 64:96] = False
    mask[:, :, 32:64] = False
    mask[:, :, 64:96, :64] = True
    return mask


def _float32_heads(B, H, L, S, dtype, device):
    """fp32 (B, H, L, S) biases, ~20% -inf; row 3 all -inf."""
    mask = torch.randn(B, H, L, S, device=device).masked_fill(_hidden((B, H, L, S), 0.2, device), float("-inf"))
    mask[:, :, 3] = float("-inf")
    return mask


def _float_inputs_dtype(B, H, L, S, dtype, device):
    """(L, S) biases in the inputs' dtype broadcast over batch and heads, large ones (+-6), ~10% -inf."""
    mask = 3 * torch.randn(L, S, device=device)
    return mask.masked_fill(_hidden((L, S), 0.1, device), float("-inf")).to(dtype)


def _bool_transposed(B, H, L, S, dtype, device):
    """(B, 1, L, S) view of a (B, 1, S, L) tensor: the key stride is L, the row stride 1."""
    return (~_hidden((B, 1, S, L), 0.3, device)).transpose(-1, -2)


def _bool_rows(B, H, L, S, dtype, device):
    """(B, 1, L, 1): whole rows hidden, stride 0 over the keys (a row mask, not key bounds)."""
    return ~_hidden((B, 1, L, 1), 0.3, device)


MASKS = {"bool_B1LS_random": _bool_random, "bool_B1LS_blocks": _bool_blocks, "float32_BHLS": _float32_heads,
         "dtype_LS": _float_inputs_dtype, "bool_transposed": _bool_transposed, "bool_rows": _bool_rows}


@pytest.mark.parametrize("dtype,name", [(FP32, name) for name in list(MASKS)[:4]]
                         + [(BF16, "bool_B1LS_blocks"), (BF16, "dtype_LS"), (FP32, "bool_transposed"),
                            (BF16, "bool_rows"), (FP16, "bool_B1LS_random")],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_mask(device, dtype, name):
    L, S = 80, 150
    q, k, v = _inputs(L, S, dtype, device)
    check(q, k, v, mask=MASKS[name](2, 2, L, S, dtype, device), lse_grad=dtype == FP32)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("name,L,S", [("bool_B1LS_blocks", 113, 150), ("float32_BHLS", 150, 97)])
def test_mask_and_causal(device, dtype, name, L, S):
    """The mask and the causal diagonal intersect (is_causal with a mask tensor: both apply)."""
    q, k, v = _inputs(L, S, dtype, device)
    check(q, k, v, UL, mask=MASKS[name](2, 2, L, S, dtype, device), lse_grad=dtype == FP32)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("name,window", [("bool_B1LS_random", (20, 3)), ("dtype_LS", (-1, 0))],
                         ids=["bool-w20_3", "float-lower_right"])
def test_mask_and_window(device, dtype, name, window):
    L, S = 80, 150
    q, k, v = _inputs(L, S, dtype, device)
    check(q, k, v, window=window, mask=MASKS[name](2, 2, L, S, dtype, device), lse_grad=dtype == FP32)


@pytest.mark.parametrize("dtype,case", [(FP32, case) for case in MASK_GRAD_INTERPRETED]
                         + [(BF16, "broadcast_batch_heads_causal"), (FP16, "small_window_dropout_gqa")],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_float_mask_gradient(device, dtype, case):
    """The float mask's gradient from the dK/dV kernel (MASK_GRAD: the tiles' dS stored), summed over the
    dims the mask broadcasts over; tiles the kernel skips (causal, window, rows past the mask) stay 0."""
    check_mask_gradient("triton", case, dtype, device)


@pytest.mark.parametrize("dtype,Hk", [(BF16, 1), (FP16, 3)], ids=["bf16-mqa_6to1", "fp16-gqa_6to3"])
def test_mask_gqa(device, dtype, Hk):
    """dK/dV sum over a group of query heads, each with its own mask (B, Hq, L, S)."""
    q, k, v = _inputs(80, 150, dtype, device, Hq=6, Hk=Hk, E=32)
    mask = _float32_heads(2, 6, 80, 150, dtype, device)
    check(q, k, v, UL, mask=mask)


# ---- soft-capping and ALiBi ---------------------------------------------------------------------

def _slopes(B, H, device):
    """ALiBi slopes (B, Hq), one per batch and head: the geometric ones of ALiBi's paper, varied by batch."""
    return (2.0 ** (-8.0 * torch.arange(1, H + 1, device=device) / H))[None, :] * torch.tensor([[1.0], [0.5]],
                                                                                                 device=device)[:B]


# (dtype, causal, window, L, S, softcap, ALiBi, q magnitude): softcap near the scores' size and far above
# it; scores large enough (q x 4) that tanh saturates and rows are nearly one-hot (the fp32 top-key
# path with the softcap derivative); ALiBi with both causal alignments and L > S, L < S
SOFTCAP_ALIBI = [(FP32, NONE, (-1, -1), 113, 203, 2.0, False, 4.0), (FP32, LR, (-1, -1), 203, 97, 0.0, True, 1.0),
                 (FP32, UL, (20, 4), 113, 64, 30.0, True, 10.0), (FP16, NONE, (-1, -1), 97, 113, 1.0, True, 1.0),
                 (BF16, LR, (-1, -1), 17, 64, 5.0, True, 1.0)]


@pytest.mark.parametrize("dtype,mode,window,L,S,softcap,alibi,magnitude", SOFTCAP_ALIBI,
                         ids=["fp32-softcap2-saturated", "fp32-alibi-lower_right-L203-S97",
                              "fp32-both-causal-w20_4", "fp16-both-L97-S113", "bf16-both-lower_right-L17"])
def test_softcap_alibi(device, dtype, mode, window, L, S, softcap, alibi, magnitude):
    q, k, v = _inputs(L, S, dtype, device)
    check((q.float() * magnitude).to(dtype), k, v, mode, window=window, lse_grad=dtype == FP32, softcap=softcap,
          alibi=_slopes(2, 2, device) if alibi else None)


def test_softcap_alibi_gqa_bounds_mask(device):
    """With GQA 6:3 and key bounds (fp16), and with a float mask tensor (fp32): softcap, then ALiBi, then
    the mask, on the tiles each visits."""
    q, k, v = _inputs(80, 150, FP16, device, Hq=6, Hk=3)
    check(q, k, v, window=(24, 0), bounds=((3, 140), (50, 120)), softcap=3.0, alibi=_slopes(2, 6, device))
    L, S = 48, 70
    q, k, v = _inputs(L, S, FP32, device)
    check(q, k, v, UL, mask=_float32_heads(2, 2, L, S, FP32, device), softcap=1.5, alibi=_slopes(2, 2, device),
          lse_grad=True)


def test_softcap_alibi_varlen(device):
    """Varlen: ALiBi's distance and slope per sequence (local rows and keys, row s of the slopes), with
    a window, softcap and an empty sequence, against reference.varlen_attention."""
    from test_varlen import _oracle, _packed, _run

    lengths = [(17, 23), (0, 5), (64, 61), (40, 33), (9, 0)]
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths, FP32, torch.Generator().manual_seed(4))
    alibi = torch.rand(len(lengths), q.shape[1])
    window, softcap = (20, 3), 2.0

    def ours(q, k, v):
        return fused_attn.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                           mq, mk, window=window, alibi_slopes=alibi.to(device), softcap=softcap,
                                           return_lse=True, backend="triton")

    def oracle(compute_dtype):
        return _oracle(compute_dtype, cu_q, cu_k, False, window, alibi_slopes=alibi, softcap=softcap)
    got = _run(ours, q, k, v, 5)
    ref = _run(oracle(torch.float64), q, k, v, 5)
    base = _run(oracle(None), q, k, v, 5)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(got[name].cpu(), ref[name], base[name], name, dtype=FP32)


# ---- tiles no row sees are skipped -------------------------------------------------------------

def _counting(monkeypatch, name):
    """Wrap the kernel loop ``name`` (its module global, which the interpreted kernels call) to
    record (tiles visited, masked, tiles starting past the loop's extent: its S, for dK/dV its L) per call."""
    inner = getattr(T, name)
    params = inspect.signature(inner.fn).parameters
    calls = []

    def counted(*args):
        a = dict(zip(params, args))
        lo, hi = (a[x].handle.data.item() if hasattr(a[x], "handle") else int(a[x]) for x in ("lo", "hi"))
        block, extent = (a["BLOCK_M"], a["L"]) if name == "_bwd_dkdv_inner" else (a["BLOCK_N"], a["S"])
        extent = extent.handle.data.item() if hasattr(extent, "handle") else int(extent)
        tiles = range(lo, hi, block)
        calls.append((len(tiles), bool(a["MASKED"]), sum(start >= extent for start in tiles)))
        return inner(*args)

    monkeypatch.setattr(T, name, counted)
    return calls


def _expected_tiles(visible, rows_block, cols_block, L, S):
    """(tiles with some visible (row, key), of those not wholly visible) over (rows_block x
    cols_block) tiles of ``visible``; a tile over the ragged end of the columns is not wholly visible
    (its missing columns are masked). The rows here divide into whole tiles (the kernels count a
    ragged row tile as wholly visible where its real rows are)."""
    some = masked = 0
    for r in range(0, visible.shape[0], rows_block):
        for c in range(0, visible.shape[1], cols_block):
            tile = visible[r:r + rows_block, c:c + cols_block]
            if tile.any():
                some += 1
                masked += not (tile.all() and tile.shape[1] == cols_block)
    return some, masked


@pytest.mark.parametrize("mode,window,bounds", [(NONE, (8, 8), None), (LR, (0, 0), None),
                                                (UL, (-1, -1), ((70, 130), (0, 40))),
                                                (NONE, (20, 3), ((33, 180), (100, 101)))],
                         ids=["window", "window_diagonal", "causal_bounds", "window_bounds"])
def test_tiles_no_row_sees_are_skipped(device, monkeypatch, mode, window, bounds):
    """Each kernel loop visits exactly the tiles where some (query, key) pair is visible, and masks
    exactly those not wholly visible (per query block for the forward and dQ, per key block for
    dK/dV); results stay right."""
    if not T.INTERPRETED:
        pytest.skip("counts the interpreter's loop calls")
    calls = {name: _counting(monkeypatch, name) for name in ("_fwd_inner", "_bwd_dq_inner", "_bwd_dkdv_inner")}
    B, Hq, Hk, L, S = 2, 2, 1, 160, 200
    q, k, v = _inputs(L, S, FP16, device, Hq=Hq, Hk=Hk)
    check(q, k, v, mode, window=window, bounds=bounds)
    spec = AttnSpec(scale=1.0, causal=mode, window_left=window[0], window_right=window[1])
    kb = None if bounds is None else torch.tensor(bounds, dtype=torch.int64)
    vis = visible_keys(L, S, spec, kb).expand(B, 1, L, S)
    bm, bn = T.INTERPRETER_BLOCKS["BLOCK_M"], T.INTERPRETER_BLOCKS["BLOCK_N"]
    rows = [_expected_tiles(vis[b, 0], bm, bn, L, S) for b in range(B)]
    cols = [_expected_tiles(vis[b, 0].T, bn, bm, S, L) for b in range(B)]
    want_rows = (Hq * sum(r[0] for r in rows), Hq * sum(r[1] for r in rows))
    want_cols = (Hq * sum(c[0] for c in cols), Hq * sum(c[1] for c in cols))
    for name, want in (("_fwd_inner", want_rows), ("_bwd_dq_inner", want_rows), ("_bwd_dkdv_inner", want_cols)):
        got = (sum(n for n, _, _ in calls[name]), sum(n for n, masked, _ in calls[name] if masked))
        assert got == want, f"{name}: (visited, masked) tiles {got}, want {want}"
    assert want_rows[0] < Hq * B * -(-L // bm) * -(-S // bn)  # something was skipped


def test_nan_keys_no_row_sees(device):
    """NaN in k and v at keys no row sees, in whole key tiles (below the lower-right diagonal
    window's reach and outside the key bounds): the kernels never visit those tiles, so out, lse
    and every gradient match the reference on clean inputs (dk = dv = 0 there). A masked visit
    would give NaN: P = 0 times v = NaN in the forward's P V, dS = 0 times k = NaN in the dQ dot."""
    L, S, bn = 40, 200, T.INTERPRETER_BLOCKS["BLOCK_N"]
    bounds = ((0, 200), (0, 180))  # batch 1: rows 26 on see no key; keys from 192 on (a whole tile) no row sees
    q, k, v = _inputs(L, S, FP32, device)
    kp, vp = k.clone(), v.clone()
    unseen = (S - L - 6) // bn * bn  # window (6, 0): row i sees keys S - L + i - 6 .. S - L + i
    kp[:, :, :unseen], vp[:, :, :unseen] = float("nan"), float("nan")
    kp[1, :, 192:], vp[1, :, 192:] = float("nan"), float("nan")
    check_clean(q, k, v, (q, kp, vp), window=(6, 0), attn_mask=_padding_mask(bounds, S, device), lse_grad=True)


def _counting_tiles(monkeypatch, name):
    """Wrap the kernel tile ``name`` (_fwd_tile, _bwd_dq_tile, _bwd_dkdv_tile) to record, per tile
    computed, whether it applied the mask tensor."""
    tile = getattr(T, name)
    params = inspect.signature(tile.fn).parameters
    applied = []

    def counted(*args):
        apply = dict(zip(params, args))["apply"]
        applied.append(bool(apply.handle.data.item()) if hasattr(apply, "handle") else bool(apply))
        return tile(*args)

    monkeypatch.setattr(T, name, counted)
    return applied


def test_mask_tiles_skipped(device, monkeypatch):
    """With a mask tensor and nothing else, each kernel computes exactly the tiles where the mask
    leaves some score visible and applies it exactly in those where it changes some (the per-tile
    summary, mask_summary); the others take the unmasked path. NaN in k and v at keys the mask hides
    from every row (whole key tiles), and in q at rows it hides entirely, stay out of every result."""
    if not T.INTERPRETED:
        pytest.skip("counts the interpreter's tile calls")
    applied = {name: _counting_tiles(monkeypatch, name) for name in ("_fwd_tile", "_bwd_dq_tile", "_bwd_dkdv_tile")}
    B, Hq, Hk, L, S = 2, 2, 1, 128, 200
    q, k, v = _inputs(L, S, FP32, device, Hq=Hq, Hk=Hk)
    mask = _bool_blocks(B, Hq, L, S, FP32, device)
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    qp[:, :, 32:64] = float("nan")  # rows the mask hides entirely
    kp[:, :, 64:96], vp[:, :, 64:96] = float("nan"), float("nan")  # keys it hides from every row
    check_clean(q, k, v, (qp, kp, vp), attn_mask=mask, lse_grad=True)
    bm, bn = T.INTERPRETER_BLOCKS["BLOCK_M"], T.INTERPRETER_BLOCKS["BLOCK_N"]
    tiles = [mask[b, 0, r:r + bm, c:c + bn] for b in range(B) for r in range(0, L, bm) for c in range(0, S, bn)]
    want = (Hq * sum(bool(t.any()) for t in tiles), Hq * sum(bool(t.any() and not t.all()) for t in tiles))
    for name, got in applied.items():
        got = (len(got), sum(got))
        assert got == want, f"{name}: (computed, mask applied) tiles {got}, want {want}"
    assert want[0] < len(tiles) * Hq and want[1] < want[0]  # some tiles skipped, some unmasked


# ---- varlen: each program's tiles lie in its own sequence --------------------------------------

# (query length, key length) per sequence: no query rows (its keys NaN below: no row sees them), no
# keys, a ragged last key tile next to them. Query lengths are whole tiles of 32 (the interpreter's
# blocks), where _expected_tiles counts as the dK/dV kernel does.
VARLEN_TILES = [(64, 100), (0, 20), (32, 45), (96, 96), (64, 0), (32, 7)]


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (20, 0)), (False, (10, 3))],
                         ids=["full", "causal_window20", "window10_3"])
def test_varlen_tiles_stay_in_their_sequence(device, monkeypatch, causal, window):
    """With varlen sequences each kernel loop visits exactly the tiles of its own sequence where some
    (query, key) pair is visible (a sequence's keys and rows counted from its first: local tiles),
    none starting past the sequence's end, masking exactly those not wholly visible; NaN in k and v
    at the keys of a sequence without queries, which its neighbours' ragged tiles overlap in the
    packed rows, stay out of every result (dk = dv = 0 there)."""
    if not T.INTERPRETED:
        pytest.skip("counts the interpreter's loop calls")
    from test_varlen import HQ, _oracle, _packed, _run  # the varlen test's packing, oracle and gradients

    calls = {name: _counting(monkeypatch, name) for name in ("_fwd_inner", "_bwd_dq_inner", "_bwd_dkdv_inner")}
    q, k, v, cu_q, cu_k, mq, mk = _packed(VARLEN_TILES, FP32, torch.Generator().manual_seed(7))
    kp, vp = k.clone(), v.clone()
    kp[100:120], vp[100:120] = float("nan"), float("nan")  # sequence 1: keys no row sees

    def ours(q, k, v):
        return fused_attn.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                           mq, mk, causal=causal, window=window, return_lse=True, backend="triton")
    got = _run(ours, q, kp, vp, 5)
    ref = _run(_oracle(torch.float64, cu_q, cu_k, causal, window), q, k, v, 5)
    base = _run(_oracle(None, cu_q, cu_k, causal, window), q, k, v, 5)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(got[name].cpu(), ref[name], base[name], name, dtype=FP32)
    spec = AttnSpec(scale=1.0, causal=LR if causal else NONE, window_left=window[0], window_right=window[1])
    bm, bn = T.INTERPRETER_BLOCKS["BLOCK_M"], T.INTERPRETER_BLOCKS["BLOCK_N"]
    rows = cols = (0, 0)
    for L, S in VARLEN_TILES:
        vis = visible_keys(L, S, spec)
        vis = torch.ones(L, S, dtype=torch.bool) if vis is None else vis
        rows = tuple(a + HQ * b for a, b in zip(rows, _expected_tiles(vis, bm, bn, L, S)))
        cols = tuple(a + HQ * b for a, b in zip(cols, _expected_tiles(vis.T, bn, bm, S, L)))
    for name, want in (("_fwd_inner", rows), ("_bwd_dq_inner", rows), ("_bwd_dkdv_inner", cols)):
        got = (sum(n for n, _, _ in calls[name]), sum(n for n, masked, _ in calls[name] if masked))
        assert got == want, f"{name}: (visited, masked) tiles {got}, want {want}"
        assert not any(beyond for _, _, beyond in calls[name]), f"{name}: a tile starts past its sequence's end"
