"""Fused attention in CUDA C++ on tensor cores (``csrc/cuda/``).

Algorithm (see ``csrc/cuda/flash_fwd_kernel.cuh``): FlashAttention-2 forward, one block
per (query block, head, batch), warps own 16 query rows, ``mma.sync.m16n8k16`` with fp32
accumulation, ``ldmatrix`` (``.trans`` for V), a 2-stage ``cp.async`` K/V pipeline in
padded shared memory, online softmax in exp2, fp32 log-sum-exp. Dtypes fp16 and bf16;
head dims up to 256 in buckets of 32 (other multiples of 8 run in the next bucket up,
others are zero-padded to a multiple of 8 here, which copies). Causal: query i sees key
j iff j <= i + offset (0 upper-left, S - L lower-right); a row that sees no key outputs
0 with lse = -inf.

Backward (``csrc/cuda/flash_bwd_kernel.cuh``): FlashAttention-2 backward in three kernels,
delta = rowsum(dO * O) - dlse, then dK/dV per key block (looping over the query tiles of
every q head of its GQA group) and dQ per query block, both recomputing P from the saved
lse. No atomics: gradients are bitwise identical run to run (there is no faster
non-deterministic mode).

Where it runs:
* CUDA tensors through the extension ``fused_attn._C_cuda`` (``csrc/cuda/binding/flash_api.cu``,
  ops ``torch.ops.fused_attn.cuda_fwd_out`` and ``cuda_bwd_out``) when it was built and holds
  code this GPU can run (:func:`arch_refusal`: machine code for its arch, or PTX it can JIT
  from; compute capability 8.0 or newer); otherwise the dispatcher says why and uses another
  backend. setup.py's FUSED_ATTN_CUDA_ARCHS chooses what is built (default: sm_80, sm_86,
  sm_89, sm_90a machine code and compute_80 PTX, so Blackwell and later GPUs JIT).
* Batch and query heads up to 65535 each (CUDA grid z and y); larger calls are refused.
* CPU tensors, through the CPU emulator of the same kernel source (``fused_attn.ops._emu``),
  when ``FUSED_ATTN_CUDA_EMULATE=1`` and backend ``"cuda"`` is asked for by name: a test
  vehicle (every global access bounds-checked), orders of magnitude slower than a GPU.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import AttnSpec, Capabilities
from ._common import define_ops, new_output

try:
    from .. import _C_cuda  # noqa: F401  (importing registers torch.ops.fused_attn.cuda_{fwd,bwd}_out)
    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # no nvcc / CUDA torch at install time, or a broken build
    _C_cuda = None
    _IMPORT_ERROR = f"the CUDA extension fused_attn._C_cuda is not available ({e})"

EMULATE_ENV = "FUSED_ATTN_CUDA_EMULATE"
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float16, torch.bfloat16),
                            features=frozenset({"causal"}), device_note=": cpu through the emulator")
MIN_CAPABILITY = (8, 0)  # mma.sync with bf16, cp.async, ldmatrix: the only features the kernels use
MAX_GRID_YZ = 65535  # grid y (query heads) and z (batch) limit of a CUDA launch


def built_archs() -> Optional[Tuple[str, ...]]:
    """What the extension was compiled for ("sm_90a": machine code, "compute_80": PTX), as
    setup.py recorded it; None if unknown (an extension built without setup.py's record)."""
    recorded = getattr(_C_cuda, "built_archs", "") if _C_cuda is not None else ""
    return tuple(recorded.split("+")) if recorded else None


def _runs_on(target: str, capability: Tuple[int, int]) -> bool:
    """Whether one compiled target runs on a GPU of ``capability`` (CUDA's compatibility rules):
    machine code sm_XY runs on X.Y' for Y' >= Y (same major), sm_XYa only on X.Y; PTX
    compute_XY is JIT-compiled for any X.Y or newer, compute_XYa only for X.Y."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if m is None:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix == "a":
        return capability == (major, minor)
    if kind == "sm" or suffix == "f":  # "f": family-specific, same major only
        return capability[0] == major and capability[1] >= minor
    return capability >= (major, minor)


def arch_refusal(capability: Tuple[int, int], built: Optional[Sequence[str]]) -> Optional[str]:
    """None if kernels built for ``built`` (see :func:`built_archs`) run on a GPU of compute
    ``capability``, else the reason they cannot, naming the arch and what was built."""
    major, minor = capability
    if capability < MIN_CAPABILITY:
        return (f"the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async); this GPU is "
                f"{major}.{minor} (sm_{major}{minor})")
    if built is None:  # nothing recorded: let the launch say whether it has a kernel image
        return None
    if any(_runs_on(t, capability) for t in built):
        return None
    return (f"fused_attn._C_cuda was built for {', '.join(built) or 'no arch'}, which cannot run on this GPU "
            f"(compute capability {major}.{minor}, sm_{major}{minor}): neither its machine code nor PTX it can "
            f"JIT from; rebuild with FUSED_ATTN_CUDA_ARCHS=native (this GPU) or an entry with +PTX, e.g. '80+PTX'")


def hardware_refusal(p, explicit: bool) -> Optional[str]:
    """Why this install or GPU cannot run problem ``p`` beyond what CAPABILITIES says (None: it can)."""
    B, H = p.q.shape[0], p.q.shape[1]
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        return (f"batch and query heads must each be <= {MAX_GRID_YZ} (CUDA grid z and y), got batch {B} "
                f"(all leading dims folded) and {H} heads")
    if p.device.type == "cuda":
        if _C_cuda is None:
            return _IMPORT_ERROR
        return arch_refusal(torch.cuda.get_device_capability(p.device), built_archs())
    if os.environ.get(EMULATE_ENV) != "1":
        return f"CPU tensors run the CUDA kernels only under emulation: set {EMULATE_ENV}=1 and ask for backend 'cuda'"
    if not explicit:
        return "the CUDA emulator is a test vehicle: it runs only when backend 'cuda' is asked for by name"
    return None


def _operand(t: Tensor) -> Tensor:
    """Unit stride on the head dim, head dim a multiple of 8 (zero-padded), 16-byte rows."""
    d = t.shape[-1]
    if d % 8:
        t = F.pad(t, (0, 8 - d % 8))
    aligned = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(3))
    return t if aligned else t.contiguous()


def _kernel_args(spec: AttnSpec, tensors: dict) -> Tuple[int, float]:
    """The spec's fields the CUDA kernels take (causal, scale); CAPABILITIES refuses the rest."""
    if spec.windowed or spec.softcap or spec.dropout_p or tensors:
        raise RuntimeError(f"the CUDA kernels run no sliding window, soft-capping, dropout, key-padding mask, mask "
                           f"tensor, ALiBi or varlen sequences, got {', '.join(tensors) or 'a spec field'}")
    return int(spec.causal), spec.scale


def _forward(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, **tensors: Tensor) -> Tuple[Tensor, Tensor]:
    args = _kernel_args(spec, tensors)
    B, H, L, _ = q.shape
    ev = v.shape[-1]
    q, k, v = _operand(q), _operand(k), _operand(v)
    out = new_output((B, H, L, v.shape[-1]), q.dtype, q.device)
    lse = new_output((B, H, L), torch.float32, q.device)
    if q.is_cuda:
        if _C_cuda is None:
            raise RuntimeError(_IMPORT_ERROR)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        torch.ops.fused_attn.cuda_fwd_out(q, k, v, out, lse, *args, stream)
    else:
        from . import _emu

        _emu.load().flash_fwd(q, k, v, out, lse, *args)
    return (out if out.shape[-1] == ev else out[..., :ev].contiguous()), lse


def _backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              spec: AttnSpec, **tensors: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    args = _kernel_args(spec, tensors)
    E, ev = q.shape[-1], v.shape[-1]
    q, k, v, out, dout = (_operand(t) for t in (q, k, v, out, dout))  # zero padding adds 0 to rowsum(dO * O)
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = new_output(lse.shape, torch.float32, q.device)  # scratch: rowsum(dO * O) - dlse
    if q.is_cuda:
        if _C_cuda is None:
            raise RuntimeError(_IMPORT_ERROR)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        torch.ops.fused_attn.cuda_bwd_out(dout, dlse, q, k, v, out, lse, dq, dk, dv, delta, *args, stream)
    else:
        from . import _emu

        _emu.load().flash_bwd(dout, dlse, q, k, v, out, lse, dq, dk, dv, delta, *args)
    return tuple(g if g.shape[-1] == d else g[..., :d].contiguous() for g, d in ((dq, E), (dk, E), (dv, ev)))


forward, backward = define_ops("cuda", __name__, ("cpu", "cuda"), lambda dtype: torch.float32)
