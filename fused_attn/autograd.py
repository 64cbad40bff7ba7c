"""The one autograd formula of the fused kernel backends, registered on each backend's ops.

A kernel backend's forward op ``fused_attn::<backend>_fwd(q, k, v, <spec>) -> (out, lse)`` and
backward op ``fused_attn::<backend>_bwd(dout, dlse, q, k, v, out, lse, <spec>, *, mask_grad) -> (dq, dk, dv,
dmask)`` (dmask: the gradient of a float mask tensor, (B, Hq, L, S), where ``mask_grad``; else empty)
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

Eager calls that nothing traces skip the ops' dispatcher layers (``dispatch._eager``): the CPU
backend's extension carries this formula compiled (``csrc/cpu/attention.cpp``, ``Attention``: its
backward runs without Python), the other backends run it as :class:`EagerAttention`.
``tests/test_ops.py`` checks both against the ops' formula bit for bit, the float mask's gradient, an
lse gradient and the double-backward message included.
"""
from __future__ import annotations

import torch

from .spec import op_arg_index


MASK_ARG = op_arg_index("mask")  # the mask tensor's place among the op arguments


def _setup_context(ctx, inputs, output):
    q, k, v, *op_args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.op_args = tuple(op_args)
    # a float mask that requires grad: the backward op computes its gradient too (ctx.needs_input_grad
    # does not cover the op arguments under AOT autograd, so it is read here)
    mask = op_args[MASK_ARG] if len(op_args) > MASK_ARG else None
    ctx.mask_grad = mask is not None and mask.requires_grad
    ctx.set_materialize_grads(False)  # an unused lse gives dlse None, not a tensor of zeros


def _attention_backward(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        mask_grad = ctx.mask_grad
        dq, dk, dv, dmask = bwd_op(dout, dlse, q, k, v, out, lse, *ctx.op_args, mask_grad=mask_grad)
        grads = [None] * len(ctx.op_args)
        if mask_grad:
            grads[MASK_ARG] = dmask
        return (dq, dk, dv, *grads)

    return backward


def double_backward_message(backend: str) -> str:
    """What a kernel backend says when gradients of its gradients are asked for."""
    return (f"fused_attn backend {backend!r} does not support double backward (gradients of gradients); use "
            "backend='reference' for it")


def _double_backward_error(backend: str) -> RuntimeError:
    return RuntimeError(double_backward_message(backend))


def _no_double_backward(backend: str):
    def backward(ctx, *grads):
        raise _double_backward_error(backend)

    return backward


class _Gradients(torch.autograd.Function):
    """The gradients of EagerAttention's backward under create_graph: themselves, refusing to be
    differentiated (as the backward op's own autograd formula does)."""

    @staticmethod
    def forward(ctx, backend, anchor, *grads):  # anchor: an input that requires grad, so the outputs do
        ctx.backend = backend
        return tuple(g.clone() for g in grads)  # fresh tensors, as the backward op's (create_graph only)

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error(ctx.backend)


class EagerAttention(torch.autograd.Function):
    """The formula above for an eager call that nothing traces (``dispatch._traced``): the backend's
    launchers called directly, without the torch.library op's Python layers (about 100 us a call
    with the op's many arguments; decoding steps and small calls pay it). The same launchers, spec
    and tensors, so the same results and gradients as through the op (tests/test_ops.py checks them
    bit for bit)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, launchers, spec, tensors, backend):
        out, lse = launchers._forward(q, k, v, spec, **tensors)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.launchers, ctx.spec, ctx.tensors, ctx.backend = launchers, spec, tensors, backend
        ctx.mask_grad = mask is not None and mask.requires_grad
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        extra = {"mask_grad": True} if ctx.mask_grad else {}
        with torch.no_grad():
            grads = ctx.launchers._backward(dout, dlse, q, k, v, out, lse, ctx.spec, **extra, **ctx.tensors)
        if torch.is_grad_enabled():  # create_graph: gradients that refuse to be differentiated
            anchor = next(t for t in (q, k, v, ctx.tensors.get("mask")) if t is not None and t.requires_grad)
            grads = _Gradients.apply(ctx.backend, anchor, *grads)
        dmask = grads[3] if ctx.mask_grad else None
        return grads[0], grads[1], grads[2], dmask, None, None, None, None


def _save_nothing(ctx, inputs, output, keyword_only_inputs=None):
    pass


def register(fwd_op, bwd_op, backend: str) -> None:
    """Make ``fwd_op`` differentiable through ``bwd_op``, and ``bwd_op`` refuse to be differentiated."""
    torch.library.register_autograd(fwd_op, _attention_backward(bwd_op), setup_context=_setup_context)
    torch.library.register_autograd(bwd_op, _no_double_backward(backend), setup_context=_save_nothing)
