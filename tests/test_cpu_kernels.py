"""The CPU backend's AVX-512 building blocks (csrc/cpu/gemm_avx512.h) on their own.

The attention tests (test_cpu.py) run them inside the kernels; here every register-block
shape is hit directly: row tails 1-5 of the 6-row micro-kernel, column tails of each of its
four 16-float vectors, A read transposed or not, overwrite / accumulate / accumulate with a
per-row factor, and leading dimensions wider than the tile. Destinations live inside a
NaN-filled buffer, so a write outside the tile, or an element left unwritten, shows.
Checked against fp64 products under the project's tolerance rule (2x plain PyTorch's fp32
error). Skipped only on CPUs without AVX-512, where these paths never run.
"""
import pytest
import torch

from fused_attn.ops import cpu
from fused_attn.testing import assert_close

pytestmark = pytest.mark.skipif(cpu._C is None or not cpu._C.has_avx512(),
                                reason="the CPU lacks AVX-512: the micro-kernel and transpose never run here")

PAD = 5  # extra columns of every buffer: leading dims wider than the tile


def _matrix(rows, cols, fill=None):
    """A rows x cols view into a (rows + 2) x (cols + PAD) buffer, one row of margin each side."""
    buf = torch.randn(rows + 2, cols + PAD) if fill is None else torch.full((rows + 2, cols + PAD), fill)
    return buf, buf[1:rows + 1, :cols]


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 13, 30])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 33, 64, 65, 130])
@pytest.mark.parametrize("a_trans", [False, True], ids=["A", "At"])
def test_gemm_shapes(M, N, a_trans):
    K = 37
    _, a = _matrix(K, M) if a_trans else _matrix(M, K)
    _, b = _matrix(K, N)
    buf, c = _matrix(M, N, fill=float("nan"))
    cpu._C._test_gemm_f32(a, a_trans, b, c, 0.75, False, None)
    op_a = a.T if a_trans else a
    want = 0.75 * op_a.double() @ b.double()
    assert_close(c, want, 0.75 * (op_a @ b), name="c")
    outside = buf.clone()
    outside[1:M + 1, :N] = float("nan")
    assert torch.isnan(outside).all(), "the micro-kernel wrote outside its tile"


@pytest.mark.parametrize("K", [1, 2, 64, 129, 300])
@pytest.mark.parametrize("mode", ["add", "rescale"])
def test_gemm_accumulate(K, mode):
    M, N = 20, 70
    _, a = _matrix(M, K)
    _, b = _matrix(K, N)
    _, c = _matrix(M, N)
    c0 = c.clone()
    rs = torch.rand(M) if mode == "rescale" else None
    cpu._C._test_gemm_f32(a, False, b, c, -1.5, True, rs)
    scale = rs.double()[:, None] if rs is not None else 1.0
    want = scale * c0.double() - 1.5 * a.double() @ b.double()
    base = (rs[:, None] if rs is not None else 1.0) * c0 - 1.5 * (a @ b)
    assert_close(c, want, base, name="c")


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 64, 100])
@pytest.mark.parametrize("cols", [1, 3, 16, 31, 64, 129])
def test_transpose(rows, cols):
    _, src = _matrix(rows, cols)
    buf, dst = _matrix(cols, rows, fill=float("nan"))
    cpu._C._test_transpose_f32(src, dst)
    assert torch.equal(dst, src.T)
    outside = buf.clone()
    outside[1:cols + 1, :rows] = float("nan")
    assert torch.isnan(outside).all(), "the transpose wrote outside its destination"


def test_bad_operands_are_refused():
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="do not chain"):
        cpu._C._test_gemm_f32(a, False, b, torch.empty(4, 6), 1.0, False, None)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu._C._test_gemm_f32(a.double(), False, b, torch.empty(4, 5), 1.0, False, None)
