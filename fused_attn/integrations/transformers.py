"""Hugging Face transformers models with their attention on fused_attn.

    import fused_attn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fused_attn")
    # or, on a loaded model: model.set_attn_implementation("fused_attn")

:func:`register` puts two functions under the name ``"fused_attn"``, and a model needs both:
:func:`attention_forward` in ``transformers.AttentionInterface`` (the attention itself) and
:func:`attention_mask` in ``transformers.masking_utils.AttentionMaskInterface`` (the mask the model
builds once per forward and hands to every layer). transformers builds no mask at all for an
implementation that has no mask function: padding would be silently ignored.

Needs transformers 5.4 or newer (``pip install fused_attn[transformers]``), whose mask functions take
``q_length`` and ``q_offset``; it serves the models whose attention goes through ``AttentionInterface``
and whose masks come from ``transformers.masking_utils`` (T5 from transformers 5.15 on). What runs where:

- The fused kernels run every call whose pattern is plain causal or full, with or without padding at
  one end of each sequence (left or right): a causal LM's prefill, a chunked prefill onto a KV cache
  and each decoding step (causal aligned lower-right, as the new queries follow the cached keys; a
  StaticCache's empty tail is padding), an encoder or cross-attention on a padded or unpadded batch.
  The mask function returns None there, or the padding as a (B, 1, 1, S) mask (per-sequence key
  bounds in the CPU and Triton kernels; the CUDA kernels leave padded calls to Triton), and the
  attention function passes ``is_causal=True``, ``window=(-1, 0)`` (lower-right causal) or nothing.
- Every call with a materialised mask (sliding windows, chunked or packed-sequence masks, custom
  mask overlays, a 4-D mask passed by the user, a StaticCache prefill with its empty tail after the
  queries, T5's relative position bias: an additive float mask, which T5 passes to every attention,
  a zero one to cross-attention) runs in the CPU and Triton kernels as a mask tensor read tile by
  tile (tiles it hides are skipped); dropout in training runs on fused_attn's reference backend
  (O(L*S) memory; fused_attn says once why).
- Rows that see no key at all (a left-padded query position) give zeros, as torch's SDPA does with
  a boolean mask. ``softcap`` (Gemma 2's logit soft-capping) runs in the CPU kernels; attention
  sinks (``s_aux``) and paged caches (continuous batching) raise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import transformers
from packaging.version import Version
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function, causal_mask_function,
                                        sdpa_mask)
from transformers.utils.import_utils import is_tracing

from ..api import scaled_dot_product_attention

MIN_VERSION = "5.4"
if Version(transformers.__version__) < Version(MIN_VERSION):
    raise ImportError(f"fused_attn.integrations.transformers needs transformers>={MIN_VERSION} (mask functions that "
                      f"take q_length and q_offset), found {transformers.__version__}: "
                      "pip install 'fused_attn[transformers]'")

NAME = "fused_attn"
UNSUPPORTED = {"s_aux": "attention sinks"}


def register() -> str:
    """Register the attention and mask functions under ``"fused_attn"`` (idempotent); returns the name,
    for ``attn_implementation=`` of ``from_pretrained`` / ``from_config`` or ``model.set_attn_implementation``."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


def _traced(*values) -> bool:
    return any(isinstance(v, Tensor) and is_tracing(v) for v in values)


def _no_padding(padding: Optional[Tensor], kv_length: int, kv_offset: int) -> bool:
    """Whether the 2-D padding mask (B, seen tokens + q_length), True = token, keeps every key in view.
    transformers pads a mask shorter than the keys with False (a StaticCache's empty tail)."""
    if padding is None:
        return True
    if padding.shape[-1] < kv_offset + kv_length:
        return False
    return bool(padding[:, kv_offset:kv_offset + kv_length].all())


def _key_padding(padding: Tensor, kv_length: int, kv_offset: int) -> Tensor:
    """The keys' part of the 2-D padding mask (B, seen tokens + q_length), True = token, as a boolean
    (B, 1, 1, kv_length) mask; keys beyond it (a StaticCache's empty tail) are padding."""
    keys = padding[:, kv_offset:kv_offset + kv_length].bool()
    if keys.shape[-1] < kv_length:
        keys = torch.cat([keys, keys.new_zeros(keys.shape[0], kv_length - keys.shape[-1])], dim=-1)
    return keys[:, None, None, :]


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask: Optional[Tensor] = None,
                   allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                   **kwargs) -> Optional[Tensor]:
    """The mask function (``AttentionMaskInterface``): None or a key-padding mask where
    :func:`attention_forward` can run the fused kernels, else transformers' boolean SDPA mask
    (B, 1, q_length, kv_length), True = may attend.

    For a pattern that is full (``bidirectional_mask_function``) or causal with the queries at the end
    of the keys (``causal_mask_function`` and q_offset - kv_offset = kv_length - q_length, i.e. aligned
    lower-right, or earlier with every key after the queries' diagonal padded, as a StaticCache's empty
    tail during decoding), when the caller allows the skip: None without padding, else the padding as
    a (B, 1, 1, kv_length) boolean mask, which :func:`attention_forward` combines with the module's
    ``is_causal`` and the fused kernels run as per-sequence key bounds (padding at one end of each
    sequence, left or right; other padding patterns run on the reference backend). Anything else
    (sliding windows, packed sequences, overlays, a StaticCache prefill, a caller that forbids the skip,
    or traced inputs) is materialised.
    """
    compact = False
    if not _traced(attention_mask, q_offset):
        if mask_function is bidirectional_mask_function:
            compact = allow_is_bidirectional_skip
        elif mask_function is causal_mask_function and allow_is_causal_skip:
            d, lower_right = int(q_offset) - kv_offset, kv_length - q_length  # query i sees keys j <= i + d
            compact = d == lower_right or (attention_mask is not None and 0 <= d < lower_right and not bool(
                _key_padding(attention_mask, kv_length, kv_offset)[..., d + 1:].any()))
    if compact:
        if _no_padding(attention_mask, kv_length, kv_offset):
            return None
        return _key_padding(attention_mask, kv_length, kv_offset)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _with_position_bias(position_bias: Tensor, mask: Optional[Tensor], causal: bool, L: int, S: int) -> Tensor:
    """T5's relative position bias (1 or B, H, L, S) and the mask as one additive float mask; masked
    positions get -inf (a row with none left outputs zeros)."""
    if causal and L > 1 and (mask is None or mask.shape[-2] == 1):  # no mask, or attention_mask's padding
        tri = torch.ones(L, S, dtype=torch.bool, device=position_bias.device).tril(S - L)  # lower-right
        mask = tri if mask is None else mask & tri
    if mask is None:
        return position_bias
    if mask.dtype == torch.bool:
        return torch.where(mask, position_bias, float("-inf"))
    return position_bias + mask


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None,
                      **kwargs) -> Tuple[Tensor, None]:
    """The attention function (``AttentionInterface``): query (B, Hq, L, E), key and value (B, Hk, S, E / Ev),
    Hk dividing Hq (GQA without copies); returns ((B, L, Hq, Ev), None) like transformers' SDPA function.

    ``attention_mask`` is what :func:`attention_mask` built: None runs the fused kernels (causal per the
    ``is_causal`` argument, else the module's ``is_causal``: upper-left when L = S, lower-right when the
    queries follow cached keys, none for one query); a boolean or float mask, ``position_bias`` (T5) or
    dropout runs on the reference backend. Attention weights are never returned.
    """
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{NAME}' does not support {what} (`{name}` was passed); "
                             "use attn_implementation='eager'")
    if kwargs.get("cache") is not None and not isinstance(kwargs["cache"], Cache):  # one the function must update
        raise ValueError(f"attn_implementation='{NAME}' does not support paged caches (continuous batching); "
                         "use attn_implementation='sdpa'")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    L, S = query.shape[2], key.shape[2]
    mask, upper_left, window = attention_mask, False, (-1, -1)
    if position_bias is not None:
        mask = _with_position_bias(position_bias, attention_mask, causal, L, S)
    elif causal and L > 1 and (mask is None or mask.shape[-2] == 1):  # no mask, or attention_mask's padding
        if L < S:
            window = (-1, 0)  # lower-right causal
        else:
            upper_left = True
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=upper_left,
                                       scale=scaling, enable_gqa=query.shape[1] != key.shape[1], window=window,
                                       softcap=kwargs.get("softcap") or 0.0)
    return out.transpose(1, 2).contiguous(), None
