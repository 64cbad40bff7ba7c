"""The one autograd formula of the fused kernel backends, registered on each backend's ops.

A kernel backend's forward op ``fused_attn::<backend>_fwd(q, k, v, <spec>) -> (out, lse)`` and
backward op ``fused_attn::<backend>_bwd(dout, dlse, q, k, v, out, lse, <spec>) -> (dq, dk, dv)``
(``<spec>``: ``AttnSpec.op_args(key_bounds, mask)``, schema ``spec.OP_ARGS_SCHEMA``) are defined by
``ops._common.define_ops``, which calls :func:`register` here: the forward op is differentiable
by itself (``torch.library.register_autograd``), so a traced or exported graph that holds the
raw op trains as the eager call does. The log-sum-exp is differentiable: its gradient enters
the backward as ``delta - dlse`` (see the kernels' headers), so users who combine partial
attentions can train through it.

The lse a backend's forward op returns is what its backward rebuilds P from, and may be more
precise than the public one (fp32; fp64 for fp64 inputs: ``ops._common.lse_dtype``): a
backend may save it in fp64 for fp32 inputs, so that P = exp2(s * scale * log2 e - lse * log2 e),
split as hi + lo, is exact at a row's largest score however large the scores are (see
``ops/_common.py``). The dispatcher gives the caller the public dtype; the backward gets the
saved one.

Double backward (gradients of gradients) is not implemented by the kernels: the backward op's
own autograd formula raises, naming the reference backend, which supports it.
"""
from __future__ import annotations

import torch


def _setup_context(ctx, inputs, output):
    q, k, v, *op_args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.op_args = tuple(op_args)
    ctx.set_materialize_grads(False)  # an unused lse gives dlse None, not a tensor of zeros


def _attention_backward(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd_op(dout, dlse, q, k, v, out, lse, *ctx.op_args)
        return (dq, dk, dv) + (None,) * len(ctx.op_args)

    return backward


def _no_double_backward(backend: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"fused_attn backend {backend!r} does not support double backward (gradients of "
                           "gradients); use backend='reference' for it")

    return backward


def _save_nothing(ctx, inputs, output):
    pass


def register(fwd_op, bwd_op, backend: str) -> None:
    """Make ``fwd_op`` differentiable through ``bwd_op``, and ``bwd_op`` refuse to be differentiated."""
    torch.library.register_autograd(fwd_op, _attention_backward(bwd_op), setup_context=_setup_context)
    torch.library.register_autograd(bwd_op, _no_double_backward(backend), setup_context=_save_nothing)
