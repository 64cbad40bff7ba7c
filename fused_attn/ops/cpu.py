"""Fused attention on the CPU: C++ kernels (``csrc/cpu/``, extension ``fused_attn._C_cpu``).

Algorithm (see ``csrc/cpu/fwd_kernel.h`` and ``bwd_kernel.h``): FlashAttention-2 on tiles
(sizes in ``csrc/cpu/config.h``), parallel over batch x heads x blocks with
``at::parallel_for``. Forward: online softmax in exp2 over key blocks, never forming L x S;
saves out and lse. Backward: recomputes P from the saved lse; delta = rowsum(dO * O) - dlse;
dK/dV per key block summed over the GQA group in a fixed order, no atomics: deterministic
for a given thread count. GEMMs: fp32 on CPUs with AVX-512 through our register-blocked
micro-kernel (``csrc/cpu/gemm_avx512.h``, forward and backward); the bf16 / fp16 forward
through oneDNN's AMX micro-kernels (``at::native::cpublas::brgemm``); MKL (through
PyTorch) for the rest. On AVX-512 the fp32 softmax (and the backward's P and dS) runs in
the micro-kernel's epilogues and the 16-bit softmax is one hand-vectorised pass, both with a
lazily moved max; compiler-vectorised clones elsewhere. Each thread packs the kv head of its
task for the forward's GEMMs where enough query rows read it (``FWD_PACK_MIN_ROWS`` in config.h; a
decoding step reads K and V in place). Split-KV (flash-decoding): a forward with fewer tasks than threads
that reads its keys in place (a decoding step of few heads) cuts each task's keys into chunks of whole key
tiles on separate threads and combines their rows through their maxima and sums.

Layout: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), any strides with a unit stride
on the last dim and rows that do not overlap (others are copied once); out (B, Hq, L, Ev);
lse (B, Hq, L), natural log. GQA: q head h reads kv head h // (Hq // Hk).
Dtypes fp32, bf16, fp16 (fp32 accumulation) and fp64 (fp64 throughout: what
``torch.autograd.gradcheck`` needs). The forward op's lse is fp64 for fp32 and fp64 inputs
(``saved_lse_dtype``; the public lse is fp32 for fp32), fp32 for bf16 / fp16. Head dims E
and Ev up to 256, independent.
Causal: query i sees key j iff j <= i + offset (0 upper-left, S - L lower-right). A sliding
window (spec.AttnSpec.window_left / right) and per-batch key bounds (a key-padding mask,
Problem.key_bounds) narrow each row's keys further: every row sees one interval of keys, and
the kernels visit only the key tiles of a block's intervals (padding and keys outside the
window cost nothing). A row that sees no key outputs 0, lse = -inf, and gets zero gradients.

Numerics at the edges: any finite scale (1e-30 to 1e30, negative too) gives exact row maxima:
the softmax subtracts the max before it scales, so no FMA contraction can move it. The
backward rebuilds P from the fp64 lse (fp32 inputs) the same way, the scale applied after
the row's score is subtracted, and recomputes the exp2 max and row sum of rows whose |lse| is
too large to recompute P from the stored lse (|lse| log2 e > 2^20 for fp32 inputs, 32 for
the others). Large scores: where one key holds most of a row's probability, its dS takes
dP - delta in double, as exact as the math path's softmax backward. NaN in, NaN out as in the math path: a NaN score
makes its row's out, lse and gradients NaN, a +inf score gives lse = +inf, -inf scores get
P = 0. Strides are 64-bit throughout: a size-1 dim may carry any stride, and a leading dim past
BLAS's int is copied before the BLAS call.

Which path runs: ``FUSED_ATTN_CPU_ISA``, read once when this module is imported (first CPU
use): ``native`` (default: the AVX-512 paths where the CPU has AVX-512, else the portable
ones), ``avx2`` or ``portable``. The portable path is what CPUs without AVX-512 / AMX run:
compiler-vectorised softmax loops, GEMMs through PyTorch's BLAS, no oneDNN brgemm; its
loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64
(SSE2), and run the CPU's best by default. ``avx2`` is the portable path with its loops at
AVX2 (what an AVX2 CPU such as AMD Zen 3 runs, on any CPU that has AVX2; there is no
hand-written AVX2 kernel yet); ``portable`` the same at baseline x86-64. PyTorch's BLAS
follows its own settings (``MKL_ENABLE_INSTRUCTIONS=AVX2``; benchmarks/bench.py --cpu-isa
sets them). ``path()`` says which path runs.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..autograd import double_backward_message
from ..spec import AttnSpec, Capabilities
from ._common import define_ops, poisoned, saved_lse_dtype

try:
    from .. import _C_cpu as _C
    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # built without the C++ extension, or a broken build
    _C = None
    _IMPORT_ERROR = (f"the C++ extension fused_attn._C_cpu did not import ({e}); reinstall with "
                     "`pip install --no-build-isolation .` and torch installed")

CAPABILITIES = Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                            features=frozenset({"causal", "window", "key_padding", "bool_mask", "float_mask", "varlen",
                                                      "alibi", "softcap", "dropout",
                                                      "mask_grad", "seqlens_k"}))
ISA_ENV = "FUSED_ATTN_CPU_ISA"
ISAS = ("native", "avx2", "portable")


def _isa_from_env() -> str:
    """FUSED_ATTN_CPU_ISA, checked: one of ISAS (unset or empty: native)."""
    raw = os.environ.get(ISA_ENV, "")
    isa = raw.strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"{ISA_ENV}={raw!r} is not a CPU path; allowed: native (default: AVX-512 where the CPU has "
                         "it), avx2 (the portable path's loops at AVX2; no hand-written AVX2 kernel yet), portable "
                         "(the same at baseline x86-64)")
    return isa


def _set_path(isa: str) -> None:
    """Point the extension at path ``isa`` (one of ISAS); tests restore ISA with it."""
    _C.set_portable_only(isa != "native")
    _C.set_vec_isa({"native": "avx512", "avx2": "avx2", "portable": "baseline"}[isa])


ISA = _isa_from_env()
if _C is not None:
    _set_path(ISA)


def path() -> str:
    """Which CPU path the kernels take in this process, and why."""
    if _C is None:
        return _IMPORT_ERROR
    if _C.has_avx512():
        return ("avx512: fp32 on the register-blocked micro-kernel with the softmax in its epilogues, hand-vectorised "
                "16-bit softmax, oneDNN brgemm for the bf16 / fp16 forward where available")
    why = "the CPU lacks AVX-512" if ISA == "native" else f"{ISA_ENV}={ISA}"
    if ISA == "avx2":
        why += "; no hand-written AVX2 kernel yet"
    return (f"portable ({why}): compiler-vectorised softmax loops at {_C.vec_isa()}, GEMMs through PyTorch's BLAS")


def _forward(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, **tensors: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward; ``tensors``: the call's tensors of spec.TENSOR_ARGS, those given. The extension
    allocates out and lse (poisoned as new_output's) and copies an operand only where it cannot be
    read in place (unit stride on the last dim, rows that do not overlap): per-call cost, which
    decoding steps and small calls pay."""
    return _C.forward(q, k, v, poisoned(), *spec.op_args(**tensors))


def _backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              spec: AttnSpec, mask_grad: bool = False, **tensors: Tensor) -> Tuple[Tensor, ...]:
    """(dq, dk, dv), and with ``mask_grad`` the float mask's gradient (B, Hq, L, S) in its dtype too. The
    extension allocates them (poisoned as new_output's) and copies q, k, v, dout only where it cannot read
    them in place (as the forward)."""
    dq, dk, dv, dmask = _C.backward(dout, dlse, q, k, v, out, lse, poisoned(), mask_grad, *spec.op_args(**tensors))
    return (dq, dk, dv) if dmask is None else (dq, dk, dv, dmask)


def _differentiable(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, **tensors: Tensor) -> Tuple[Tensor, Tensor]:
    """(out, lse) as _forward, recorded for autograd by the extension itself: the autograd formula of
    ``fused_attn.autograd`` (the same kernels as the ops' backward; a float mask's gradient where it requires
    grad; double backward refused with autograd's message), in C++ (csrc/cpu/attention.cpp, ``Attention``):
    eager training calls skip a Python autograd.Function's per-call cost, forward and backward."""
    return _C.differentiable_forward(q, k, v, poisoned(), *spec.op_args(**tensors))


forward, backward = define_ops("cpu", __name__, ("cpu",), saved_lse_dtype)
if _C is not None:
    _C.set_double_backward_message(double_backward_message("cpu"))


# A float mask or ALiBi bias enters the raw scores as bias / scale (csrc/cpu/mask_ops.h): |scale|
# below this would overflow it.
FLOAT_MASK_MIN_SCALE = 1e-30


def hardware_refusal(p, explicit: bool) -> Optional[str]:
    """Why this install cannot run problem ``p`` beyond what CAPABILITIES says (None: it can)."""
    float_mask = p.mask is not None and p.mask.dtype != torch.bool
    if _IMPORT_ERROR is None and (float_mask or p.alibi_slopes is not None or p.spec.softcap) \
            and abs(p.spec.scale) < FLOAT_MASK_MIN_SCALE:
        what = "a float attn_mask" if float_mask else "ALiBi" if p.alibi_slopes is not None else "softcap"
        return f"{what} with |scale| < {FLOAT_MASK_MIN_SCALE:g} is not supported, got scale = {p.spec.scale:g}"
    return _IMPORT_ERROR


def gemm_backend() -> str:
    """Which GEMM library the kernels call per dtype (MKL through PyTorch, or portable loops)."""
    return _IMPORT_ERROR or _C.gemm_backend()
