"""The one autograd.Function that every fused kernel backend runs through.

A kernel backend is a module in ``fused_attn.ops`` exposing ``forward(q, k, v,
causal, scale) -> (out, lse)`` and ``backward(do, dlse, q, k, v, out, lse, causal,
scale) -> (dq, dk, dv)``, both registered ``torch.library`` ops. The log-sum-exp is
differentiable: its gradient enters the backward as ``delta - dlse`` (see the
kernels' headers), so users who combine partial attentions can train through it.

The lse a backend's forward returns is what its backward rebuilds P from, and may be more
precise than the public one (fp32; fp64 for fp64 inputs: ``ops._common.lse_dtype``): a
backend may save it in fp64 for fp32 inputs, so that P = exp2(s * scale * log2 e - lse * log2 e),
split as hi + lo, is exact at a row's largest score however large the scores are (see
``ops/_common.py``). The caller sees it rounded to the public dtype; the backward gets the
saved one.
"""
from __future__ import annotations

import torch

from .ops._common import lse_dtype


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ops, causal, scale):
        out, lse = ops.forward(q, k, v, int(causal), scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ops, ctx.causal, ctx.scale = ops, int(causal), scale
        ctx.set_materialize_grads(False)
        public = lse_dtype(q.dtype)
        return out, lse if lse.dtype == public else lse.to(public)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.ops.backward(dout, dlse, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None
