"""Input checks and canonicalisation shared by every backend.

The public functions accept torch's SDPA shapes ``(N..., L, E)`` (rank >= 2).
Everything below works on the canonical 4-D form ``(B, H, L, E)``: all leading
batch dims (broadcast between q and k/v, as torch does) are folded into B, the
dim before L is the head dim H (a rank-2 input has B = H = 1; a rank-3 input
``(N, L, E)`` has B = 1, H = N, which is what torch's ``enable_gqa`` assumes).
No data is copied for 3-D and 4-D inputs whose batch dims agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from .reference import CausalMode

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Problem:
    """One attention call in canonical form."""

    q: Tensor  # (B, Hq, L, E)
    k: Tensor  # (B, Hk, S, E)
    v: Tensor  # (B, Hk, S, Ev)
    mask: Optional[Tensor]  # bool / float, (B, Hq, L, S) possibly with stride-0 dims; never causal
    causal: CausalMode
    scale: float
    dropout_p: float
    needs_grad: bool
    out_shape: Tuple[int, ...]  # shape of the output the user gets back

    @property
    def L(self) -> int:
        return self.q.shape[2]

    @property
    def S(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def restore(self, out: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
        """Canonical (B, Hq, L, Ev) / (B, Hq, L) results back to the user's shape."""
        return out.reshape(self.out_shape), lse.reshape(self.out_shape[:-1])


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _causal_from_bias(bias: CausalBias, L: int, S: int) -> CausalMode:
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(
            f"attn_mask is a CausalBias for (L, S) = ({bias.seq_len_q}, {bias.seq_len_kv}) "
            f"but query/key have L = {L}, S = {S}")
    if bias.variant == CausalVariant.UPPER_LEFT:
        return CausalMode.UPPER_LEFT
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return CausalMode.LOWER_RIGHT
    raise ValueError(f"unsupported CausalBias variant {bias.variant!r}")


def make_problem(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False) -> Problem:
    """Check the arguments of ``scaled_dot_product_attention`` and canonicalise them."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q, k, v = query, key, value
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            "query, key and value must have the same number of dimensions, got "
            f"query {_shape(q)}, key {_shape(k)}, value {_shape(v)}")
    if q.dim() < 2:
        raise ValueError(f"query, key and value must be at least 2-D (..., L, E), got query {_shape(q)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"query, key and value must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; allowed: "
                        + ", ".join(str(d) for d in SUPPORTED_DTYPES))
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.numel() == 0:
            raise ValueError(f"{name} has an empty dimension: shape {_shape(t)}; every dim must be >= 1")
    L, E = q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must have the same head dim E, got query {_shape(q)}, key {_shape(k)}")
    if v.shape[-2] != S:
        raise ValueError(f"key and value must have the same length S, got key {_shape(k)}, value {_shape(v)}")
    rank = q.dim()
    if rank >= 3:
        Hq, Hk = q.shape[-3], k.shape[-3]
        if v.shape[-3] != Hk:
            raise ValueError(f"key and value must have the same number of heads, got key {_shape(k)}, value {_shape(v)}")
        if Hq != Hk:
            if not enable_gqa:
                raise ValueError(
                    f"query has {Hq} heads but key/value have {Hk} (dim -3); grouped-query attention "
                    "needs enable_gqa=True")
            if Hq % Hk != 0:
                raise ValueError(
                    f"grouped-query attention needs query heads divisible by key/value heads, got {Hq} and {Hk}")
        try:
            batch = tuple(q.shape[:-3])
            if not (k.shape[:-3] == v.shape[:-3] == batch):  # the common case skips broadcasting
                batch = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]))
        except RuntimeError:
            raise ValueError(
                "the batch dims of query, key and value (all but the last three) must broadcast, got "
                f"query {_shape(q)}, key {_shape(k)}, value {_shape(v)}") from None
    else:
        Hq = Hk = 1
        batch = ()
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(E)  # symbolic under torch.compile(dynamic=True): no float() of it
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    causal = CausalMode.UPPER_LEFT if is_causal else CausalMode.NONE
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal=True were both given; pass one of them")
        if isinstance(attn_mask, CausalBias):
            causal = _causal_from_bias(attn_mask, L, S)
        elif isinstance(attn_mask, Tensor):
            if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
                raise TypeError(
                    f"attn_mask must be bool or have the query's dtype {q.dtype}, got {attn_mask.dtype}")
            if attn_mask.device != q.device:
                raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
            full = batch + ((Hq,) if rank >= 3 else ()) + (L, S)
            try:
                ok = tuple(torch.broadcast_shapes(attn_mask.shape, full)) == full
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {full}")
            mask = attn_mask.expand(full).reshape(-1, Hq, L, S)
        else:
            raise TypeError(f"attn_mask must be a Tensor, a CausalBias or None, got {type(attn_mask).__name__}")

    def canon(t: Tensor, H: int) -> Tensor:
        if rank == 4 and t.shape[0] == batch[0]:
            return t  # already (B, H, L, E)
        if rank >= 3:
            t = t.expand(batch + tuple(t.shape[-3:]))
        return t.reshape((-1, H) + tuple(t.shape[-2:]))

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out_shape = batch + tuple(q.shape[-min(rank, 3):-1]) + (v.shape[-1],)
    return Problem(canon(q, Hq), canon(k, Hk), canon(v, Hk), mask, causal, scale,
                   float(dropout_p), needs_grad, out_shape)
