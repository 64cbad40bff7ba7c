"""Sliding windows and per-batch key bounds inside the Triton kernels (interpreter), forward and
backward, against the fp64 reference under the tolerance rule (fused_attn.testing.assert_close):
out, lse, dq, dk, dv; with causal (both alignments), GQA and the lse gradient. Then that tiles
no row sees are skipped, not computed and masked: by counting the tiles each kernel's loops
visit, and by NaN keys in such tiles, which a masked visit would spread (0 * NaN in P V and dS K).

Key bounds reach the kernels from a boolean key-padding mask (B, 1, 1, S) that make_problem turns
into Problem.key_bounds (checked). Lower-right causal with key bounds has no public spelling (one
attn_mask), so those cases run make_problem's Problem with its causal mode set, through
dispatch.run, as the public functions do.
"""
import dataclasses
import inspect

import pytest
import torch

import fused_attn
from fused_attn import dispatch, reference
from fused_attn.ops import triton_attention as T
from fused_attn.problem import make_problem
from fused_attn.spec import AttnSpec, CausalMode, visible_keys
from fused_attn.testing import assert_close, stores_bf16_by_truncation

from attn_cases import make_inputs, mode_id

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


def _attend(q, k, v, mode, window, bounds):
    """(out, lse) of the Triton backend through make_problem and dispatch (see the module doc)."""
    S = k.shape[-2]
    mask = None if bounds is None else _padding_mask(bounds, S, q.device)
    args = dict(attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1], window=window)
    if mode is LR and bounds is not None:
        p = make_problem(q, k, v, **args)
        p = dataclasses.replace(p, spec=dataclasses.replace(p.spec, causal=LR))
        assert p.key_bounds is not None
        return p.restore(*dispatch.run(p, "triton"))
    if mode is LR:
        args["attn_mask"] = torch.nn.attention.bias.causal_lower_right(q.shape[-2], S)
    if bounds is not None:
        assert make_problem(q, k, v, is_causal=mode is UL, **args).key_bounds is not None, "not the kernels' key bounds"
    return fused_attn.attention_with_lse(q, k, v, is_causal=mode is UL, backend="triton", **args)


def _results(attend, q, k, v, seed, lse_grad, dtype=None):
    """out, lse, dq, dk, dv of ``attend`` on leaves of q, k, v (as ``dtype``): gradients of
    sum(out * dout) + sum(lse * dlse) over finite lse, dout and dlse drawn from ``seed``, as
    attn_cases.run_attention."""
    g = torch.Generator().manual_seed(seed)
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attend(*leaves)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=q.dtype).double()
    total = (out.double() * dout).sum()
    if lse_grad:
        dlse = torch.randn(lse.shape, generator=g).to(lse.device).double()
        total = total + (torch.where(torch.isinf(lse), 0.0, lse.double()) * dlse).sum()
    return dict(out=out.detach(), lse=lse.detach(), **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(total, leaves))))


def check(q, k, v, mode=NONE, window=(-1, -1), bounds=None, lse_grad=False, clean=None):
    """The Triton kernels against the fp64 reference under the tolerance rule, as
    attn_cases.check_backend, with a window and key bounds. ``clean``: (q, k, v) the references
    run on instead (the kernels' inputs hold NaN where no row looks). Returns the max error ratios."""
    kb = None if bounds is None else torch.tensor(bounds, dtype=torch.int64, device=q.device)
    rq, rk, rv = clean or (q, k, v)
    seed = int(torch.randint(2 ** 31, ()))

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=mode, window=window, key_bounds=kb)

    got = _results(lambda q, k, v: _attend(q, k, v, mode, window, bounds), q, k, v, seed, lse_grad)
    want = _results(ref, rq, rk, rv, seed, lse_grad, torch.float64)
    base = _results(ref, rq, rk, rv, seed, lse_grad)
    assert got["out"].dtype == q.dtype and got["lse"].dtype == torch.float32
    truncated = stores_bf16_by_truncation("triton", q.dtype)
    ratios = {}
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name == "lse":
            ratios[name] = assert_close(got[name], want[name], base[name], name, dtype=q.dtype)
        else:
            ratios[name] = assert_close(got[name], want[name], base[name], name, truncated_bf16=truncated)
    return ratios


def _inputs(L, S, dtype, device, Hq=2, Hk=1, E=16, B=2):
    return make_inputs(B, Hq, Hk, L, S, E, E, dtype, device)


# (window, L, S): both sides, one side each way, a window of one key (0, 0), one wider than S on the
# left, and single rows and keys; L > S and L < S over several ragged blocks.
WINDOWS = [((0, 0), 64, 64), ((5, -1), 113, 203), ((-1, 3), 203, 97), ((16, 16), 17, 64),
           ((300, 2), 113, 203), ((2, 0), 1, 1), ((0, 40), 203, 97)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("window,L,S", WINDOWS, ids=[f"w{w[0]}_{w[1]}-L{L}-S{S}" for w, L, S in WINDOWS])
def test_window(device, dtype, window, L, S):
    check(*_inputs(L, S, dtype, device), window=window, lse_grad=dtype == FP32)


# window and causal intersect; the window is aligned bottom-right whatever the causal alignment
WINDOW_CAUSAL = [(UL, (16, 0), 203, 97), (UL, (40, 8), 64, 64), (LR, (7, 5), 113, 203), (LR, (20, -1), 203, 97)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("mode,window,L,S", WINDOW_CAUSAL,
                         ids=[f"{mode_id(m)}-w{w[0]}_{w[1]}-L{L}-S{S}" for m, w, L, S in WINDOW_CAUSAL])
def test_window_and_causal(device, dtype, mode, window, L, S):
    check(*_inputs(L, S, dtype, device), mode, window=window)


# per-batch key bounds: an empty range and the full one; a range starting and ending inside a block
# (blocks of 32 under the interpreter); left padding; a single key
KEY_BOUNDS = {  # of S: the bounds of batches 0 and 1
    "empty-full": lambda S: ((0, 0), (0, S)),
    "mid_block": lambda S: ((5, S - 7), (37, 150)),
    "left_pad-one_key": lambda S: ((S - 20, S), (40, 41)),
}


@pytest.mark.parametrize("dtype,name", [(dtype, name) for dtype in (FP32, BF16) for name in KEY_BOUNDS]
                         + [(FP16, "mid_block")], ids=lambda x: str(x).replace("torch.", ""))
def test_key_bounds(device, dtype, name):
    L, S = 113, 203
    check(*_inputs(L, S, dtype, device), bounds=KEY_BOUNDS[name](S), lse_grad=dtype == FP32)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("mode,window,L,S,bounds", [
    (UL, (30, 4), 203, 97, ((10, 90), (0, 0))),
    (LR, (9, 3), 113, 203, ((5, 196), (60, 203))),
    (LR, (64, -1), 17, 64, ((0, 33), (31, 64))),
], ids=["upper_left-L203-S97", "lower_right-L113-S203", "lower_right-L17-S64"])
def test_key_bounds_causal_window(device, dtype, mode, window, L, S, bounds):
    check(*_inputs(L, S, dtype, device), mode, window=window, bounds=bounds, lse_grad=dtype == FP32)


@pytest.mark.parametrize("Hk", [1, 3], ids=["mqa_6to1", "gqa_6to3"])
def test_gqa(device, Hk):
    """dK/dV sum over each kv head's group of query heads under a window and key bounds."""
    q, k, v = _inputs(113, 203, FP16, device, Hq=6, Hk=Hk, E=32)
    check(q, k, v, LR, window=(24, 8), bounds=((3, 190), (50, 120)))


def test_fp16_window_causal(device):
    check(*_inputs(203, 97, FP16, device, E=32), UL, window=(12, 12))


# ---- tiles no row sees are skipped -------------------------------------------------------------

def _counting(monkeypatch, name):
    """Wrap the kernel loop ``name`` (its module global, which the interpreted kernels call) to
    record (tiles visited, masked) per call."""
    inner = getattr(T, name)
    params = inspect.signature(inner.fn).parameters
    calls = []

    def counted(*args):
        a = dict(zip(params, args))
        lo, hi = (a[x].handle.data.item() if hasattr(a[x], "handle") else int(a[x]) for x in ("lo", "hi"))
        block = a["BLOCK_M"] if name == "_bwd_dkdv_inner" else a["BLOCK_N"]
        calls.append((len(range(lo, hi, block)), bool(a["MASKED"])))
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
        got = (sum(n for n, _ in calls[name]), sum(n for n, masked in calls[name] if masked))
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
    ratios = check(q, kp, vp, LR, window=(6, 0), bounds=bounds, lse_grad=True, clean=(q, k, v))
    assert all(r <= 2.0 for r in ratios.values())
