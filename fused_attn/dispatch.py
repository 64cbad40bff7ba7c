"""The one place that decides which backend runs an attention call.

Backends are keyed by (operation, name): the operation is what the call computes (today
``"attention"``; KV-cache decoding and additive attention enter here as their own operations,
with their own backends), the name what users choose (``backend=``). For one operation,
backends are tried in the order :func:`order` gives for the problem's device; each answers
:meth:`refusal` with ``None`` (it can run the problem) or a short reason it cannot. A kernel
backend's reason comes from its module's ``CAPABILITIES`` (data: devices, dtypes, head dims,
features; see ``fused_attn.spec.Capabilities``) and then its ``hardware_refusal`` (code: the
import, the GPU's arch, grid limits, test vehicles). The requested backend comes
from, in this order: the ``backend=`` argument, the innermost
:func:`use_backend` context (per thread), the ``FUSED_ATTN_BACKEND`` environment variable
(read at every call), else automatic choice. An explicit backend that cannot run
the problem raises with its reason; automatic choice takes the first backend
that can and, when that is the reference, says once why the others refused.

Under ``torch.compile`` all of this is traced (no graph break): the choice is made when a
function is compiled, and the compiled code is guarded on what it read (the tensors' dtype,
device and shapes, the ``use_backend`` context), so a change recompiles. The one exception is
the environment variable, which torch.compile reads when it compiles, not at every call
(Dynamo does not guard on ``os.environ``): set it before compiling, or use ``backend=`` /
:func:`use_backend`. A backend's op module is imported on its first use, through
:func:`torch.compiler.assume_constant_result` so that a first use under compile does not
break the graph (an import's outcome is fixed for the life of the process).

Per-call cost (small calls and decoding steps, where this Python is most of the time): automatic
choice remembers, per call configuration (device, dtype, features, head dims), the first backend
whose capabilities take it, and asks only its hardware refusal again; eager calls that nothing
traces run the op's implementation directly (``_eager``); and the common call of
``scaled_dot_product_attention`` (plain 4-D CPU tensors, no mask or other option) takes a lane
(:func:`run_common`) once its configuration has been chosen, skipping the Problem and choose.
``benchmarks/per_call.py`` measures it against torch.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import autograd, reference
from .ops._common import getenv, lse_dtype
from .problem import Problem, common_call

ENV_VAR = "FUSED_ATTN_BACKEND"
# The innermost use_backend() of each thread, in a thread-local attribute (not a ContextVar:
# torch.compile cannot read those, and it guards on this attribute's value).
class _Context(threading.local):
    backend: Optional[str] = None  # a class default: no AttributeError raised and caught per call


_context = _Context()
_said: set = set()


@torch.compiler.assume_constant_result
def _import_error(op: str, name: str) -> Optional[str]:
    """Import the op module of kernel backend ``name`` of operation ``op`` once; the ImportError's
    message, or None.

    Imported on first use (triton, the CUDA extension), not when fused_attn is. Under
    torch.compile this runs when the function is compiled, outside the traced graph.
    """
    b = BACKENDS[(op, name)]
    if b._ops is None and b._import_error is None:
        try:
            b._ops = importlib.import_module(f"fused_attn.ops.{b.module}")
        except ImportError as e:
            b._import_error = str(e)
    return b._import_error


@torch.compiler.assume_constant_result
def _say_once(msg: str) -> bool:
    """Warn ``msg`` the first time it comes up. Under torch.compile: once, when compiling (Dynamo
    cannot trace ``warnings.warn``, and a warning per compiled call would not be "once" anyway)."""
    if msg not in _said:
        _said.add(msg)
        warnings.warn(msg, stacklevel=5)
    return True


_refusals: Dict[tuple, Optional[str]] = {}


def _capability_refusal(caps, name: str, features, dtype, device, head_dim: int, head_dim_v: int) -> Optional[str]:
    """``caps.refusal(...)``, backend ``name``'s CAPABILITIES (data: one answer per configuration,
    cached by the backend's name; the frozen dataclass itself hashes slowly, field by field)."""
    if torch.compiler.is_compiling():  # a dict Dynamo traced and guarded on would recompile once it fills
        return caps.refusal(name, features, dtype, device, head_dim, head_dim_v)
    key = (name, features, dtype, device.type, head_dim, head_dim_v)
    try:
        return _refusals[key]
    except KeyError:
        if len(_refusals) > 4096:
            _refusals.clear()
        why = _refusals[key] = caps.refusal(name, features, dtype, device, head_dim, head_dim_v)
        return why


def _launch(ops: ModuleType, p: Problem) -> Tuple[Tensor, Tensor]:
    """What backend module ``ops``'s forward op runs (its launcher), called without the op."""
    return ops._forward(p.q, p.k, p.v, p.spec, **p.tensor_args())


def _traced(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether something traces or intercepts this call, so that it must go through the torch.library
    op: torch.compile / export / jit tracing, a dispatch mode, a functorch transform, or a tensor
    subclass. Otherwise the op's implementation runs directly (with autograd.EagerAttention where
    gradients are needed), saving the dispatcher's Python layers (tens of microseconds: decoding
    steps, small calls)."""
    return (torch.compiler.is_compiling()
            or not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor)
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None)


def _needs_grad(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether autograd records this call: inputs, or a float mask, that require grad."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (mask is not None and mask.requires_grad))


def _eager(ops: ModuleType, p: Problem, name: str) -> Tuple[Tensor, Tensor]:
    """(out, lse) of a call nothing traces, on backend ``name`` (op module ``ops``): its op's implementation
    called directly, with the op's autograd formula where gradients are needed: the op module's
    ``_differentiable`` where it has one (the formula in its extension), else autograd.EagerAttention."""
    if _needs_grad(p.q, p.k, p.v, p.mask):
        differentiable = getattr(ops, "_differentiable", None)  # the formula in the extension (cpu)
        if differentiable is not None:
            return differentiable(p.q, p.k, p.v, p.spec, **p.tensor_args())
        return autograd.EagerAttention.apply(p.q, p.k, p.v, p.mask, ops, p.spec, p.tensor_args(), name)
    return _launch(ops, p)


class KernelBackend:
    """A fused kernel backend whose ops live in ``fused_attn.ops.<module>``. ``cpu_by_name_only``: its
    CPU path is a test vehicle (an interpreter, an emulator) that runs only when asked for by name, so
    automatic choice passes it over for CPU tensors without asking (its reason is asked for only
    when a fallback message names it)."""

    def __init__(self, op: str, name: str, module: str, cpu_by_name_only: bool = False):
        self.op, self.name, self.module = op, name, module
        self.cpu_by_name_only = cpu_by_name_only
        self._ops: Optional[ModuleType] = None
        self._import_error: Optional[str] = None

    def ops(self) -> ModuleType:
        """The backend's op module; raises ImportError if it cannot be imported."""
        why = _import_error(self.op, self.name)
        if why is not None:
            raise ImportError(why)
        return self._ops

    def capability_refusal(self, p: Problem) -> Optional[str]:
        """Why this backend cannot run calls like ``p`` (None: it can): the import and its CAPABILITIES, what
        depends only on the call's configuration (device, dtype, features, head dims), not on its sizes or
        the GPU."""
        try:
            ops = self.ops()
        except ImportError as e:
            return f"not available in this install ({e})"
        return _capability_refusal(ops.CAPABILITIES, self.name, p.features(), p.dtype, p.device, p.head_dim,
                                   p.head_dim_v)

    def hardware_refusal(self, p: Problem, explicit: bool) -> Optional[str]:
        """Why this backend cannot run ``p`` although it runs calls like it: the op module's
        ``hardware_refusal`` (the GPU's arch, grid limits, test vehicles); asked after capability_refusal."""
        return (self._ops or self.ops()).hardware_refusal(p, explicit)

    def refusal(self, p: Problem, explicit: bool) -> Optional[str]:
        """Why this backend cannot run ``p`` (None: it can): its capabilities, then its hardware checks."""
        return self.capability_refusal(p) or self.hardware_refusal(p, explicit)

    def run(self, p: Problem) -> Tuple[Tensor, Tensor]:
        """(out, lse) through the backend's forward op, which is differentiable (fused_attn.autograd),
        where something traces the call; otherwise straight through the op's implementation (_eager)."""
        ops = self._ops or self.ops()
        if _traced(p.q, p.k, p.v):
            return ops.forward(p.q, p.k, p.v, *p.spec.op_args(**p.tensor_args()))
        return _eager(ops, p, self.name)


class ReferenceBackend:
    """Naive PyTorch (fused_attn.reference), computed in fp32 for 16-bit inputs."""

    name = "reference"

    def capability_refusal(self, p: Problem) -> Optional[str]:
        return None

    def hardware_refusal(self, p: Problem, explicit: bool) -> Optional[str]:
        return None

    def refusal(self, p: Problem, explicit: bool) -> Optional[str]:
        return None

    def run(self, p: Problem):
        dt = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        window = (p.spec.window_left, p.spec.window_right)
        if p.cu_seqlens_q is not None:
            out, lse = reference.varlen_attention(p.q, p.k, p.v, p.cu_seqlens_q, p.cu_seqlens_k, p.spec.dropout_p,
                                                  p.spec.causal, p.spec.scale, window=window,
                                                  alibi_slopes=p.alibi_slopes, softcap=p.spec.softcap,
                                                  dropout_seed=p.dropout_seed, compute_dtype=dt)
        elif p.seqlens_k is not None:  # (make_kvcache_problem: no mask, key bounds or dropout)
            out, lse = reference.cached_attention(p.q, p.k, p.v, p.seqlens_k, p.spec.causal, p.spec.scale,
                                                  window=window, alibi_slopes=p.alibi_slopes, softcap=p.spec.softcap,
                                                  compute_dtype=dt)
        else:
            out, lse = reference.attention(p.q, p.k, p.v, p.mask, p.spec.dropout_p, p.spec.causal, p.spec.scale,
                                           window=window, key_bounds=p.key_bounds, alibi_slopes=p.alibi_slopes,
                                           softcap=p.spec.softcap, dropout_seed=p.dropout_seed, compute_dtype=dt)
        return out.to(p.dtype), lse


ATTENTION = "attention"  # the operation of scaled_dot_product_attention and attention_with_lse
BACKENDS = {
    (ATTENTION, "triton"): KernelBackend(ATTENTION, "triton", "triton_attention", cpu_by_name_only=True),
    (ATTENTION, "cuda"): KernelBackend(ATTENTION, "cuda", "cuda", cpu_by_name_only=True),
    (ATTENTION, "cpu"): KernelBackend(ATTENTION, "cpu", "cpu"),
    (ATTENTION, "reference"): ReferenceBackend(),
}
NAMES = tuple(dict.fromkeys(name for _, name in BACKENDS))  # what backend= accepts


def get(name: str, op: str = ATTENTION):
    """Backend ``name`` of operation ``op``."""
    return BACKENDS[(op, name)]
# Automatic choice: the expected fastest first (to be confirmed by GPU benchmarks). On
# Hopper the Triton kernels use wgmma and TMA while the CUDA kernels use Ampere's
# mma.sync; before Hopper both use mma.sync and the hand-written CUDA kernels go first.
# CPU tensors skip triton and cuda (their CPU paths are test vehicles, run only by name).
ORDER = ("triton", "cuda", "cpu", "reference")
ORDER_BEFORE_HOPPER = ("cuda", "triton", "cpu", "reference")


def order(device: torch.device) -> tuple:
    """Backends in the order automatic choice tries them for tensors on ``device``."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return ORDER_BEFORE_HOPPER
    return ORDER


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown fused_attn backend {name!r}; choose one of {', '.join(ORDER)} or None for automatic")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the attention calls inside the block on backend ``name`` (None: automatic).

    The choice holds for the calling thread (other threads keep theirs), also for a function
    compiled with torch.compile, which recompiles when it is called under another choice. It is
    per thread, not per asyncio task: a block that awaits shares its choice with the thread's other tasks.
    """
    name = None if name is None else _check_name(name)
    outer = _context.backend
    _context.backend = name
    try:
        yield
    finally:
        _context.backend = outer


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for by argument, context or environment; None for automatic."""
    name = backend or _context.backend or (os.environ.get(ENV_VAR) if torch.compiler.is_compiling()
                                           else getenv(ENV_VAR)) or None
    if name in (None, "auto"):
        return None
    return _check_name(name)


def refusals(p: Problem, explicit: bool = False, op: str = ATTENTION) -> Dict[str, Optional[str]]:
    """Each backend's reason for refusing ``p`` (None where it can run it), in automatic order."""
    return {name: get(name, op).refusal(p, explicit) for name in order(p.device)}


def run(p: Problem, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of attention problem ``p`` on the backend :func:`choose` picks, in canonical
    shapes; lse may be more precise than the public dtype (``Problem.restore`` casts it)."""
    chosen = choose(p, backend)
    if _empty(p.q, p.k):
        return _attend_to_nothing(p)
    return chosen.run(p)


def _empty(q: Tensor, k: Tensor) -> bool:
    """Whether canonical q (B, Hq, L, E) and k (B, Hk, S, E) leave no work: no key (S = 0) or no query row."""
    B, H, L, _ = q.shape
    return k.shape[2] == 0 or B * H * L == 0


def _attend_to_nothing(p: Problem) -> Tuple[Tensor, Tensor]:
    """A call with no key (S = 0) or no query row (B, H or L is 0), which no backend launches: the
    output is empty, or (S = 0) zeros with lse -inf, as torch gives. Computed as (q k^T) v, so that
    gradients flow as torch's do (zeros for q, empty for k and v)."""
    Hq, Hk = p.q.shape[1], p.k.shape[1]
    k, v = p.k, p.v
    if Hk > 1 and Hk != Hq:  # GQA: Hk divides Hq; Hk = 1 broadcasts in matmul
        k, v = k.repeat_interleave(Hq // Hk, dim=1), v.repeat_interleave(Hq // Hk, dim=1)
    out = torch.matmul(torch.matmul(p.q, k.transpose(-2, -1)), v)  # (B, Hq, L, Ev)
    return out, torch.full(out.shape[:-1], float("-inf"), dtype=lse_dtype(p.dtype), device=p.device)


# Automatic choice per call configuration (device, dtype, features, head dims): the first backend in order whose
# capabilities take it, where every backend before it refused it by capability (so that only its hardware
# refusal is left to ask per call). Not used while torch.compile traces (see _capability_refusal).
_choices: Dict[tuple, "KernelBackend"] = {}


# The common call's lane (run_common): common calls (Problem.common) on CPU tensors, by (dtype, head dims,
# causal), that automatic choice gave a kernel backend, filled by choose. LANES = False turns it off (tests
# that watch choose or run see every call then).
LANES = True
_lanes: Dict[tuple, "KernelBackend"] = {}


def _lane(p: Problem) -> tuple:
    return p.q.dtype, p.q.shape[3], p.v.shape[3], p.spec.causal


def run_common(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, enable_gqa: bool) -> Optional[Tensor]:
    """The output of a common call (``problem.common_call``: what scaled_dot_product_attention gets with no
    mask, dropout, window, ALiBi, softcap, scale or backend) on CPU tensors under automatic choice, nothing
    tracing it, where choose has given its configuration a kernel backend before (the lane); None for
    any other call, which then takes the general path (make_problem, run). The lane's backend is what choose
    would give again: a configuration's capability refusals do not change, nor the CPU backends' hardware
    refusals for such calls. Per-call cost: it skips choose's and the Problem's layers (small calls,
    decoding steps)."""
    if not LANES or _context.backend is not None or _traced(q, k, v) or not q.is_cpu or getenv(ENV_VAR):
        return None
    p = common_call(q, k, v, is_causal, None, enable_gqa)
    if p is None:
        return None
    b = _lanes.get(_lane(p))
    if b is None or _empty(q, k):  # (an empty call: the general path's _attend_to_nothing)
        return None
    return _eager(b._ops, p, b.name)[0]


def choose(p: Problem, backend: Optional[str] = None, op: str = ATTENTION):
    """The backend of operation ``op`` that runs ``p``: the requested one (which raises if it
    cannot), else the first in :func:`order` that can."""
    name = requested_backend(backend)
    if name is not None:
        why = get(name, op).refusal(p, explicit=True)
        if why is not None:
            raise RuntimeError(f"fused_attn backend {name!r} cannot run this call: {why}")
        return get(name, op)
    q = p.q
    backends = order(q.device) if q.is_cuda else ORDER  # (what order() gives any other device; per-call cost)
    # what capability refusals depend on, and the order backends are tried in
    key = None if torch.compiler.is_compiling() else (op, backends, q.device, q.dtype, p.features(), q.shape[3],
                                                        p.v.shape[3])
    if key is not None:
        b = _choices.get(key)
        if b is not None and b.hardware_refusal(p, explicit=False) is None:
            return b
    reasons = {}
    by_configuration = True  # every backend so far refused calls like p (not p's sizes or the GPU)
    for name in backends:
        b = get(name, op)
        if p.device.type == "cpu" and getattr(b, "cpu_by_name_only", False):
            reasons[name] = None  # refuses (see KernelBackend); its reason only if a message needs it
            continue
        why = b.capability_refusal(p)
        capable = why is None
        why = why or b.hardware_refusal(p, explicit=False)
        if why is None:
            if name == "reference" and reasons:
                msg = "fused_attn: running naive PyTorch attention (O(L*S) memory) because " + "; ".join(
                    f"{n}: {r or get(n, op).refusal(p, explicit=False)}" for n, r in reasons.items())
                _say_once(msg)
            elif key is not None and by_configuration:
                if len(_choices) > 4096:
                    _choices.clear()
                _choices[key] = b
                if p.common and q.is_cpu and op == ATTENTION and len(_lanes) < 1024:
                    _lanes[_lane(p)] = b  # (the CPU backends' hardware refusals take every such call)
            return b
        by_configuration = by_configuration and not capable
        reasons[name] = why
    raise AssertionError("the reference backend refuses nothing")
