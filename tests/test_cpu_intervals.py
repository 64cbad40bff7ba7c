"""The CPU kernels' tile ops with per-row key intervals [begin, end) (csrc/cpu/tile_ops.h and
the AVX-512 epilogues), checked against plain PyTorch on one score tile.

The attention tests reach the tile ops only through causal masks, whose intervals all start
at 0; a sliding window will start them later. Here each row of a tile gets its own interval,
begin > 0 included, and empty ones (begin == end, begin > end), through the test hooks
_test_softmax_step (the forward's online softmax: SoftmaxEpilogue on the fp32 micro-kernel,
online_softmax_avx512 for 16-bit, the compiler-vectorised loops elsewhere) and _test_probs
(the backward's P: ProbsEpilogue, or probs()), on every path: native (AVX-512 where the
CPU has it), avx2 and portable (baseline x86-64). A tile every row sees wholly takes the
unmasked path, covered too. Inputs are fresh random; outputs start as NaN, so anything left
unwritten (or written past the tile) shows.
"""
import math
import random

import pytest
import torch

from fused_attn.ops import cpu

pytestmark = pytest.mark.skipif(cpu._C is None, reason="the CPU extension is not built")

LOG2E = 1.0 / math.log(2.0)
LAZY_MAX_SLACK = 8.0  # csrc/cpu/config.h: how far (log2 units) the forward's lazy max may trail
PAD = 3  # P's leading dim is wider than the tile
ROWS, COLS, E = 13, 150, 40  # a 6-row micro-kernel tail, three 64-key panels with a tail


@pytest.fixture(params=["native", "avx2", "portable"])
def path(request):
    """Each CPU path as FUSED_ATTN_CPU_ISA names it; restored afterwards."""
    if request.param == "avx2":
        cpu._C.set_vec_isa("avx2")
        if cpu._C.vec_isa() != "avx2":
            cpu._set_path(cpu.ISA)
            pytest.skip("the CPU lacks AVX2")
        cpu._C.set_portable_only(True)
    else:
        cpu._set_path(request.param)
    yield request.param
    cpu._set_path(cpu.ISA)


def _intervals(kind, gen):
    """Per-row [begin, end) relative to the tile: random with begin > 0, or the whole tile."""
    if kind == "full":
        return torch.zeros(ROWS, dtype=torch.long), torch.full((ROWS,), COLS, dtype=torch.long)
    begin = torch.randint(1, COLS, (ROWS,), generator=gen)
    end = torch.minimum(begin + torch.randint(1, COLS, (ROWS,), generator=gen), torch.tensor(COLS))
    begin[0], end[0] = 5, 5          # empty
    begin[1], end[1] = 40, 17        # empty, begin > end
    begin[2], end[2] = 70, COLS + 9  # runs past the tile: clamped
    begin[3], end[3] = 63, 65        # across a panel boundary
    return begin, end


def _visible(begin, end):
    cols = torch.arange(COLS)
    return (cols[None, :] >= begin[:, None]) & (cols[None, :] < end[:, None])


def _generator():
    seed = random.randrange(2**31)
    print(f"seed {seed}")  # shown on failure
    return torch.Generator().manual_seed(seed)


def _operands(dtype, gen):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(ROWS, E, generator=gen, dtype=torch.float64).to(acc)
    k = torch.randn(COLS, E, generator=gen, dtype=torch.float64).to(acc)
    return q, k, acc


def _p_buffer(dtype):
    buf = torch.full((ROWS, COLS + PAD), float("nan"), dtype=dtype)
    return buf, buf[:, :COLS]


def _check_padding(buf):
    assert torch.isnan(buf[:, COLS:].float()).all(), "written past the tile"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["intervals", "full"])
@pytest.mark.parametrize("state", ["first", "running"], ids=["first_block", "later_block"])
@pytest.mark.parametrize("scale", [0.125, -0.3])
def test_softmax_step(path, dtype, kind, state, scale):
    gen = _generator()
    q, k, acc = _operands(dtype, gen)
    begin, end = _intervals(kind, gen)
    if state == "first":
        m0, l0 = torch.full((ROWS,), -math.inf, dtype=acc), torch.zeros(ROWS, dtype=acc)
    else:  # a reference near the rows' scores, some rows still at -inf
        m0 = (torch.randn(ROWS, generator=gen, dtype=torch.float64) * 4).to(acc)
        m0[::4] = -math.inf
        l0 = torch.where(m0 == -math.inf, 0.0, torch.rand(ROWS, generator=gen, dtype=torch.float64) * 10).to(acc)
    m, l = m0.clone(), l0.clone()
    corr = torch.full((ROWS,), float("nan"), dtype=acc)
    buf, p = _p_buffer(dtype)
    cpu._C._test_softmax_step(q, k, begin, end, scale, m, l, corr, p)
    _check_padding(buf)

    vis = _visible(begin, end)
    sgn, asc = (1.0 if scale > 0 else -1.0), abs(scale) * LOG2E
    t = sgn * (q.double() @ k.double().T)                    # (ROWS, COLS)
    t_max = torch.where(vis, t, -math.inf).amax(dim=1)
    m_new, m_old = m.double(), m0.double()
    # m is the row's reference: the running max (portable) or a lazy one at most
    # LAZY_MAX_SLACK (log2 units) below it (AVX-512); never moves down, never past the max.
    running = torch.maximum(m_old, t_max)
    seen = running > -math.inf
    assert (m_new[~seen] == -math.inf).all(), (m_new, running)
    r, m_r = running[seen], m_new[seen]
    assert (m_r >= m_old[seen]).all() and (m_r <= r + 1e-5 * r.abs().clamp(min=1)).all(), (m_new, running)
    assert ((r - m_r) * asc <= LAZY_MAX_SLACK + 1e-3).all(), (m_new, running)
    m_use = torch.where(m_new == -math.inf, 0.0, m_new)
    want_p = torch.where(vis, torch.exp2((t - m_use[:, None]) * asc), 0.0)
    want_corr = torch.where(m_old == m_new, 1.0,
                            torch.where(m_old == -math.inf, 0.0, torch.exp2((m_old - m_new) * asc)))
    want_l = l0.double() * want_corr + want_p.sum(dim=1)
    got_p = p.double()
    assert (got_p[~vis] == 0).all(), "P not 0 outside a row's interval"
    # P <= 2^LAZY_MAX_SLACK; scores summed in fp32 (relative 1e-6 of |s| ~ 10, times asc)
    # and P rounded to the storage dtype (fp16: subnormal below 2^-14, spaced 2^-24).
    rtol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    atol = 2 ** -24 if dtype == torch.float16 else 1e-30
    torch.testing.assert_close(got_p, want_p, rtol=rtol, atol=atol)
    torch.testing.assert_close(corr.double(), want_corr, rtol=rtol if dtype == torch.float64 else 2e-5, atol=1e-30)
    torch.testing.assert_close(l.double(), want_l, rtol=1e-12 if dtype == torch.float64 else 2e-5, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["intervals", "full"])
@pytest.mark.parametrize("scale", [0.125, -0.3])
def test_probs(path, dtype, kind, scale):
    gen = _generator()
    q, k, acc = _operands(dtype, gen)
    begin, end = _intervals(kind, gen)
    vis = _visible(begin, end)
    s = q.double() @ k.double().T
    if dtype == torch.float32:  # raw scores: P = exp2((sgn s - hi) |scale| log2 e - lo)
        g, a, x = (1.0 if scale > 0 else -1.0), abs(scale) * LOG2E, s
    else:                       # scores in log2 units: P = exp2(s scale log2 e - hi - lo)
        g, a, x = 1.0, 1.0, s * scale * LOG2E
    # Row terms as the backward takes them from the lse: hi near the row's max, lo the log2
    # of its sum, so that P is the row's softmax.
    y = torch.where(vis, g * x, -math.inf)
    hi = y.amax(dim=1).clamp(min=-1e30).to(acc)
    lo = torch.log2(torch.exp2((y - hi.double()[:, None]) * a).sum(dim=1).clamp(min=1e-300)).to(acc)
    buf, p = _p_buffer(acc)
    cpu._C._test_probs(q, k, begin, end, scale, hi, lo, p, dtype)
    _check_padding(buf)
    want = torch.where(vis, torch.exp2((g * x - hi.double()[:, None]) * a - lo.double()[:, None]), 0.0)
    assert (p[~vis] == 0).all(), "P not 0 outside a row's interval"
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(p.double(), want, rtol=rtol, atol=1e-30)


def test_bad_intervals_are_refused():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    p = torch.empty(4, 6)
    m, l, corr = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="begin and end"):
        cpu._C._test_softmax_step(q, k, torch.zeros(3, dtype=torch.long), torch.ones(4, dtype=torch.long), 1.0,
                                  m, l, corr, p)
    with pytest.raises(RuntimeError, match="must be"):
        cpu._C._test_softmax_step(q.double(), k, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long),
                                  1.0, m, l, corr, p)
