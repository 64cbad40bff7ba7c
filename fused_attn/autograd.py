"""The one autograd.Function that every fused kernel backend runs through.

A kernel backend is a module in ``fused_attn.ops`` exposing ``forward(q, k, v,
causal, scale) -> (out, lse)`` and ``backward(do, dlse, q, k, v, out, lse, causal,
scale) -> (dq, dk, dv)``, both registered ``torch.library`` ops. The log-sum-exp is
differentiable: its gradient enters the backward as ``delta - dlse`` (see the
kernels' headers), so users who combine partial attentions can train through it.
"""
from __future__ import annotations

import torch


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ops, causal, scale):
        out, lse = ops.forward(q, k, v, int(causal), scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ops, ctx.causal, ctx.scale = ops, int(causal), scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.ops.backward(dout, dlse, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None
