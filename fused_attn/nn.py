"""Drop-in ``nn.Module``s whose attention runs through :func:`fused_attn.scaled_dot_product_attention`.

:class:`MultiheadAttention` has ``torch.nn.MultiheadAttention``'s constructor, forward
signature, parameter names and state_dict, so a torch module's weights load with
``strict=True`` and give the same outputs, attention weights and gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .api import scaled_dot_product_attention

__all__ = ["MultiheadAttention"]


def _append_column(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key that every query may see: a False (bool) or 0 (float) column."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(nn.Module):
    r"""Drop-in for :class:`torch.nn.MultiheadAttention` with fused attention.

    Arguments, shapes, masks and return values are torch's: inputs ``(L, N, E)``
    (``(N, L, E)`` with ``batch_first=True``) or unbatched ``(L, E)``; ``attn_mask``
    ``(L, S)`` or ``(N * num_heads, L, S)`` and ``key_padding_mask`` ``(N, S)``, boolean
    (True = may NOT attend, the opposite of SDPA's convention) or additive float.

    Which kernel runs: the attention goes through
    :func:`fused_attn.scaled_dot_product_attention` (``backend=`` picks one, None:
    automatic). With no mask, or with ``is_causal=True``, no mask tensor is built and the
    fused kernels run it; a ``key_padding_mask`` alone or with ``is_causal=True`` that pads
    each sequence at one end (right or left: one run of attended keys per sequence) runs in
    the CPU and Triton kernels as per-sequence key bounds (nothing of size L x S); any other
    mask is a mask tensor the kernels read tile by tile. Dropout in training runs in the kernels
    (``fused_attn.dropout``).

    ``need_weights=True`` (torch's default) does not change which kernel computes
    the output; the weights are computed separately as ``softmax(q k^T / sqrt(d) +
    mask)``: one extra O(N * num_heads * L * S) computation and memory. Pass
    ``need_weights=False`` where the weights are not used.

    Differences from torch:

    * ``is_causal=True`` is, as in torch, a hint that ``attn_mask`` is the causal mask.
      Torch runs upper-left causal attention and ignores ``attn_mask`` when there is no
      ``key_padding_mask`` and ``need_weights=False``, and applies ``attn_mask`` otherwise;
      fused_attn runs the causal kernels (with the ``key_padding_mask`` if any: the same
      result when the hint is true), except with ``add_bias_kv`` / ``add_zero_attn``
      and ``need_weights=True``, where it applies ``attn_mask`` as torch does (the extra
      key is then visible to every query). The returned weights use ``attn_mask`` itself.
      Without ``attn_mask`` it raises, as torch's documented path does (torch's
      inference fast path silently ignores it).
    * A query that may see no key at all (all of its keys masked) outputs zeros (torch 2.13:
      NaN with ``need_weights=True``, whose output it computes from the weights; zeros with
      ``need_weights=False``); its returned weights are NaN, as torch's.
    * In training with ``dropout > 0`` the returned weights are those before dropout
      (the output uses dropped-out weights, as in torch).
    * There is no nested-tensor fast path.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _mask(self, mask: Optional[Tensor], name: str, shapes, dtype: torch.dtype) -> Optional[Tensor]:
        """Check an MHA mask's shape; float masks are cast to the inputs' dtype."""
        if mask is None:
            return None
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
        if tuple(mask.shape) not in shapes:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected "
                             + " or ".join(str(s) for s in shapes))
        return mask if mask.dtype == torch.bool else mask.to(dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """See :class:`torch.nn.MultiheadAttention.forward`; returns ``(attn_output, attn_weights or None)``."""
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask, "
                               "so attn_mask is needed too (as in torch.nn.MultiheadAttention)")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, _ = query.shape  # query (N, L, E) from here on
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if query.shape[2] != self.embed_dim:
            raise ValueError(f"query has {query.shape[2]} features, expected embed_dim = {self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must have the same batch and length, got key {tuple(key.shape)} "
                             f"and value {tuple(value.shape)}")
        attn_mask = self._mask(attn_mask, "attn_mask", [(L, S), (N * H, L, S)], query.dtype)
        key_padding_mask = self._mask(key_padding_mask, "key_padding_mask", [(N, S)], query.dtype)
        # torch's hint: attn_mask is causal, so without a padding mask run is_causal, no tensor. Torch does
        # so only with need_weights=False and otherwise applies attn_mask itself: the same for a true hint,
        # except for the extra key of add_bias_kv / add_zero_attn, which attn_mask (padded) shows to every
        # query and is_causal hides from all but the last.
        extra_key = self.bias_k is not None or self.add_zero_attn
        causal = is_causal and not (need_weights and extra_key)

        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _append_column(attn_mask), _append_column(key_padding_mask)
        q = q.view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = k.view(N, k.shape[1], H, D).transpose(1, 2)  # (N, H, S', D)
        v = v.view(N, v.shape[1], H, D).transpose(1, 2)  # (N, H, S', D)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)
            attn_mask, key_padding_mask = _append_column(attn_mask), _append_column(key_padding_mask)

        mask = self._merge_masks(attn_mask, key_padding_mask, N, q.dtype)  # (N or 1, H or 1, L, S') or None
        dropout_p = self.dropout if self.training else 0.0
        # Causal: the padding mask alone, (N, 1, 1, S'), which the kernels take as key bounds.
        sdpa_mask = self._merge_masks(None, key_padding_mask, N, q.dtype) if causal else mask
        out = scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p,
                                           is_causal=causal, backend=self.backend)  # (N, H, L, D)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))  # (N, L, E)

        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (N, H, L, S')
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = torch.softmax(scores, dim=-1)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S')
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], N: int,
                     dtype: torch.dtype) -> Optional[Tensor]:
        """MHA masks -> one SDPA mask: boolean (True = may attend) when both are boolean, else additive float."""
        masks = []
        if attn_mask is not None:
            L, S = attn_mask.shape[-2:]
            masks.append(attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(N, -1, L, S))
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(N, 1, 1, -1))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            return ~blocked
        total = 0
        for m in masks:
            total = total + (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
                             if m.dtype == torch.bool else m)
        return total
