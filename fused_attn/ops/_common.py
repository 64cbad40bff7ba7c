"""Small helpers shared by the kernel backends' launchers."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional

import torch

from ..spec import OP_ARGS_SCHEMA, AttnSpec

POISON_ENV = "FUSED_ATTN_POISON"

# CPython's store behind os.environ (a dict; its keys encoded by os.environ.encodekey): os.environ.get of an
# unset variable raises and catches two KeyErrors, a couple of microseconds that every small call paid twice.
_ENV_STORE = getattr(os.environ, "_data", None)
if not (isinstance(_ENV_STORE, dict) and hasattr(os.environ, "encodekey") and hasattr(os.environ, "decodevalue")):
    _ENV_STORE = None
_ENV_KEYS: dict = {}


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, read at each call (what os.environ holds now), without its cost for an unset
    variable. Not for code torch.compile traces (it reads os.environ's private store): use os.environ.get there."""
    if _ENV_STORE is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    raw = _ENV_STORE.get(key)
    return None if raw is None else os.environ.decodevalue(raw)


def poisoned() -> bool:
    """Whether outputs are NaN-filled before the kernels write them (FUSED_ATTN_POISON=1: the tests)."""
    return getenv(POISON_ENV) == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised output tensor; NaN-filled when FUSED_ATTN_POISON=1 (the tests set it),
    so any element a kernel forgets to write shows up as NaN."""
    if poisoned():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but need unit stride on the last (head) dim."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def allow_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (torch's new or legacy setting)."""
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if new != "none":
        return new == "tf32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.get_float32_matmul_precision() != "highest"
        except RuntimeError:
            return False


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# What each backend's forward saves for its backward, which rebuilds P = exp(s * scale - lse)
# from it (issue 12 item 1). In fp32, lse is rounded to an ulp of itself: at scores ~ 1e3 that
# is ~6e-5, so P at a row's largest score misses 1 / l by that much relative and the fp32
# gradients came out hundreds of times worse than plain fp32 PyTorch's. CPU: fp32 lse, and for
# rows with a large |lse| the backward recomputes the row max and sum exactly (see
# csrc/cpu/bwd_kernel.h). Triton: an fp64 lse for fp32 inputs (saved_lse_dtype), joined from the
# forward's fp32 row max and its fp64 log-sum, which the backward splits into two fp32 halves,
# hi + lo, so that s * scale * log2(e) - hi is exact at the row max. CUDA: fp16/bf16 only, where
# P is rounded to 16 bits before its dots and an fp32 lse is more than precise enough. The caller
# always gets the public lse (lse_dtype); autograd.py hands the saved one to the backward.
def saved_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse a backend that saves fp64 for fp32 inputs returns from its forward op: fp64 for
    fp32 and fp64 inputs, fp32 for fp16 and bf16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _fake_backward(dout, dlse, q, k, v, out, lse, *op_args, mask_grad=False):
    """Shapes of a backend's backward op (dq, dk, dv like q, k, v; dmask like the mask or empty), for torch.compile."""
    mask = AttnSpec.from_op_args(*op_args)[1].get("mask")
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def define_ops(backend: str, module: str, device_types, saved_lse: Callable[[torch.dtype], torch.dtype]):
    """Defines and returns backend ``backend``'s ops, ``torch.ops.fused_attn.<backend>_fwd`` and
    ``<backend>_bwd``, for the devices in ``device_types``, run by the launchers of op module
    ``module`` (its ``__name__``; looked up at each call, so a test may substitute them):

    * ``<backend>_fwd(q, k, v, <spec>) -> (out (B, Hq, L, Ev), lse (B, Hq, L))`` runs
      ``_forward(q, k, v, spec, **tensors)``; lse's dtype is ``saved_lse(q.dtype)`` (what the
      backward reads);
    * ``<backend>_bwd(dout, dlse, q, k, v, out, lse, <spec>, *, mask_grad) -> (dq, dk, dv, dmask)`` runs
      ``_backward(dout, dlse, q, k, v, out, lse, spec, **tensors)``, with ``mask_grad=True`` where the
      gradient of the float mask tensor is asked for (a backend whose CAPABILITIES hold "mask_grad":
      its launcher then returns dmask too, in the mask's shape and dtype; otherwise dmask is empty);

    where ``<spec>`` is ``AttnSpec.op_args(**tensors)`` (schema ``OP_ARGS_SCHEMA``) and ``spec``,
    ``tensors`` what ``AttnSpec.from_op_args`` rebuilds from it: the call's tensors that are given,
    by their ``spec.TENSOR_ARGS`` names (a launcher takes those of the features it runs as keyword
    arguments; the dispatcher sends it no others). Registers their fake implementations (torch.compile, export) and
    the autograd formula (``fused_attn.autograd``)."""
    from .. import autograd

    launchers = sys.modules[module]
    fwd_name, bwd_name = f"fused_attn::{backend}_fwd", f"fused_attn::{backend}_bwd"
    torch.library.define(fwd_name, f"(Tensor q, Tensor k, Tensor v, {OP_ARGS_SCHEMA}) -> (Tensor, Tensor)")
    torch.library.define(bwd_name, "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
                                   f"Tensor lse, {OP_ARGS_SCHEMA}, *, bool mask_grad=False) "
                                   "-> (Tensor, Tensor, Tensor, Tensor)")

    def fwd_impl(q, k, v, *op_args):
        spec, tensors = AttnSpec.from_op_args(*op_args)
        return launchers._forward(q, k, v, spec, **tensors)

    def bwd_impl(dout, dlse, q, k, v, out, lse, *op_args, mask_grad=False):
        spec, tensors = AttnSpec.from_op_args(*op_args)
        if mask_grad:
            return launchers._backward(dout, dlse, q, k, v, out, lse, spec, mask_grad=True, **tensors)
        return (*launchers._backward(dout, dlse, q, k, v, out, lse, spec, **tensors), q.new_empty((0,)))

    def fwd_fake(q, k, v, *op_args):
        B, H, L, _ = q.shape
        return q.new_empty((B, H, L, v.shape[3])), q.new_empty((B, H, L), dtype=saved_lse(q.dtype))

    for device_type in device_types:
        torch.library.impl(fwd_name, device_type)(fwd_impl)
        torch.library.impl(bwd_name, device_type)(bwd_impl)
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(_fake_backward)
    fwd_op = getattr(torch.ops.fused_attn, f"{backend}_fwd").default
    bwd_op = getattr(torch.ops.fused_attn, f"{backend}_bwd").default
    autograd.register(fwd_op, bwd_op, backend)
    return fwd_op, bwd_op
