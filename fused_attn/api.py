"""The documented public functions."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

from torch import Tensor

from . import dispatch, kvcache
from .problem import NO_WINDOW, make_kvcache_problem, make_problem, make_varlen_problem


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window: Tuple[int, int] = NO_WINDOW,
                                 alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                                 backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments and semantics: inputs ``(N..., L, E)`` whose leading dims, the head dim
    included, broadcast as in ``torch.matmul`` (q, k and v may have different ranks),
    ``scale`` defaults to ``1/sqrt(E)``, ``is_causal`` is aligned upper-left, ``attn_mask``
    may be a boolean (True = may attend) or additive float tensor (float32 or the inputs'
    dtype) broadcastable to ``(N..., L, S)``, or a ``torch.nn.attention.bias.CausalBias``
    (``causal_upper_left`` / ``causal_lower_right``); a mask tensor together with
    ``is_causal=True`` applies both, as torch's default dispatch does. Grouped-query
    attention with ``enable_gqa=True``: key and value heads each divide the query heads
    (their counts may differ). Empty dims give torch's results (an empty output, or zeros
    when S = 0); ``dropout_p=1`` gives zeros.

    Keyword-only extra: ``window=(left, right)``, a sliding window as FlashAttention-2's
    ``window_size``: query i sees keys j with ``i + S - L - left <= j <= i + S - L + right``
    (aligned bottom-right; -1: unbounded on that side); it combines with the other masks.
    ``alibi_slopes``: ALiBi as FlashAttention-2's, fp32 slopes of shape (Hq,) or (N..., Hq) (per
    batch entry and head): the score of query i and key j gets ``-slope * |i + S - L - j|``
    added after the scale. ``softcap > 0``: logit soft-capping as FlashAttention-2's, a score x
    (after the scale) becomes ``softcap * tanh(x / softcap)`` before ALiBi and the masks.

    The fused kernels run causal masks, CausalBias and sliding windows without building any
    mask, and key-padding masks without reading them per element: a boolean or float (0 / -inf)
    mask of shape ``(N..., 1, 1, S)`` that admits one run of consecutive keys per batch entry
    (right or left padding) becomes per-batch key bounds, and the CPU and Triton kernels skip
    the padded keys' tiles. Any other boolean or float mask is read tile by tile where it is
    stored (tiles it hides are skipped); a float mask that requires grad gets its gradient from
    the CPU and Triton kernels. What a backend does not run (see :func:`fused_attn.explain_dispatch`) runs on
    the reference backend (O(L*S) memory) under automatic choice and is refused by an explicit
    kernel backend.

    ``dropout_p > 0`` drops probabilities inside the CPU and Triton kernels, nothing of size L x S stored: one
    Philox stream (``fused_attn.dropout``) seeded per call from torch's default generator, so
    ``torch.manual_seed`` reproduces a call and every backend drops the same elements; the
    backward draws them again.

    A query row that sees no key at all (a fully masked row, or ``causal_lower_right`` with
    L > S) outputs zeros and gets zero gradients, as torch 2.13 and FlashAttention do.
    Difference from torch: ``scale`` must be finite (torch accepts inf and NaN and returns NaN).

    ``backend``: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"`` or None (automatic;
    see :func:`fused_attn.use_backend` and the ``FUSED_ATTN_BACKEND`` environment variable).
    """
    if attn_mask is None and not dropout_p and window is NO_WINDOW and alibi_slopes is None and not softcap \
            and scale is None and backend is None:
        out = dispatch.run_common(query, key, value, is_causal, enable_gqa)  # the common call's lane
        if out is not None:
            return out
    p = make_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, alibi_slopes,
                     softcap)
    return p.restore_out(dispatch.run(p, backend)[0])


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                       *, window: Tuple[int, int] = NO_WINDOW, alibi_slopes: Optional[Tensor] = None,
                       softcap: float = 0.0, dropout_p: float = 0.0,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Attention that also returns the softmax log-sum-exp.

    Arguments as :func:`scaled_dot_product_attention` (``window``, ``alibi_slopes``, ``softcap``
    too; ``dropout_p`` keyword-only here, and lse is that of the probabilities before dropout, as
    FlashAttention's). Returns
    ``(out, lse)``: ``out`` as there, ``lse`` float32 of shape ``(N..., Hq, L)``, the natural
    log of each query row's sum of ``exp(scale * q.k + mask)`` over the keys it sees
    (``-inf`` for a row that sees none). Both are differentiable. Two attentions over
    disjoint key sets combine exactly as ``out = w1 * out1 + w2 * out2`` with
    ``w_i = exp(lse_i - logaddexp(lse1, lse2))``.
    """
    p = make_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, alibi_slopes,
                     softcap)
    return p.restore(*dispatch.run(p, backend))


def explain_dispatch(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                     enable_gqa: bool = False, *, window: Tuple[int, int] = NO_WINDOW,
                     alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0) -> Dict[str, Optional[str]]:
    """For each backend, in automatic-choice order, why it would refuse this call (None: it can run it)."""
    p = make_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, alibi_slopes,
                     softcap)
    return dispatch.refusals(p)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, dropout_p: float = 0.0, scale: Optional[float] = None,
                     causal: bool = False, window: Tuple[int, int] = NO_WINDOW, alibi_slopes: Optional[Tensor] = None,
                     softcap: float = 0.0, return_lse: bool = False,
                     backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over variable-length sequences packed along the first dim, FlashAttention-2's
    ``flash_attn_varlen_func``: no padding, nothing of size (sequences x max length) or L x S.

    ``q`` (total_q, Hq, E), ``k`` (total_k, Hk, E), ``v`` (total_k, Hk, Ev), Hk dividing Hq (GQA,
    MQA); ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 or int64 (n_seq + 1,): sequence b is query
    rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) against keys [cu_seqlens_k[b], cu_seqlens_k[b + 1])
    (empty sequences allowed); ``max_seqlen_q`` / ``max_seqlen_k`` at least the longest sequence
    (FlashAttention sizes its grid with them; here they are checked). ``causal`` is aligned
    bottom-right within each sequence (query i of a sequence with L queries and S keys sees keys
    j <= i + S - L), as is ``window=(left, right)`` (see :func:`scaled_dot_product_attention`).
    ``scale`` defaults to 1/sqrt(E). ``alibi_slopes``: fp32 (Hq,) or (n_seq, Hq), the bias
    ``-slope * |i + S - L - j|`` of each sequence's own lengths. Returns out (total_q, Hq, Ev), and
    with ``return_lse`` also the log-sum-exp (Hq, total_q), fp32 (FlashAttention's layout; -inf for
    rows that see no key). ``softcap`` as in :func:`scaled_dot_product_attention`. Both results are
    differentiable. ``dropout_p`` as in :func:`scaled_dot_product_attention` (the packed rows index
    the stream).
    """
    p = make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                            causal, window, alibi_slopes, softcap)
    out, lse = p.restore(*dispatch.run(p, backend))  # (1, Hq, total_q, Ev), (1, Hq, total_q)
    out = out[0].transpose(0, 1).contiguous()
    return (out, lse[0]) if return_lse else out


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                           v: Optional[Tensor] = None, *, cache_seqlens: Union[None, int, Tensor] = None,
                           block_table: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                           window: Tuple[int, int] = NO_WINDOW, alibi_slopes: Optional[Tensor] = None,
                           softcap: float = 0.0, return_lse: bool = False,
                           backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention against a KV cache, FlashAttention-2's ``flash_attn_with_kvcache``: decoding steps and chunked
    prefill without concatenating caches. Computes no gradients (call it under ``torch.no_grad()``).

    ``q`` (B, Hq, L, E). A contiguous cache: ``k_cache`` (B, Hk, S_max, E), ``v_cache`` (B, Hk, S_max, Ev).
    A paged cache: ``k_cache`` (num_blocks, Hk, block_size, E), ``v_cache`` (num_blocks, Hk, block_size, Ev)
    and ``block_table`` int32 / int64 (B, max_blocks): batch b's key j is row j % block_size of block
    ``block_table[b, j // block_size]``. Hk divides Hq (GQA, MQA). Any strides with a unit last stride:
    FlashAttention's (B, S, H, E) tensors pass as ``.transpose(1, 2)`` views, no copy (and appends land in
    them).

    ``cache_seqlens`` int32 / int64 (B,) or an int: how many keys each batch's cache holds (None: full, S_max
    or max_blocks * block_size). New keys ``k`` (B, Hk, L_new, E) and values ``v`` (B, Hk, L_new, Ev), if
    given, are first written into the caches in place at positions cache_seqlens[b] .. cache_seqlens[b] +
    L_new - 1; ``cache_seqlens`` itself is not changed (add L_new to it for the next step). Batch b then
    attends to its first cache_seqlens[b] + L_new keys; the cache's other slots are never read, so
    they may hold anything (NaN included). Appending past a cache's capacity raises ValueError naming the
    batch; so do lengths outside [0, capacity] and block_table entries outside the cache that a batch uses.

    ``causal`` (default True) aligns bottom-right to each batch's key count n: query i sees keys j <= i + n - L,
    as do ``window=(left, right)`` and ALiBi's ``-slope * |i + n - L - j|`` (``alibi_slopes`` fp32 (Hq,) or
    (B, Hq)); ``softcap`` and ``scale`` as in :func:`scaled_dot_product_attention`. A row that sees no key
    (cache_seqlens 0 and nothing appended) outputs zeros and lse -inf. Returns out (B, Hq, L, Ev), and with
    ``return_lse`` also the log-sum-exp (B, Hq, L), fp32 (fp64 for fp64 inputs).

    Which backends run it: the CPU and Triton kernels read the contiguous cache in place, each batch's keys
    up to its count only; a paged cache is gathered into a contiguous copy of the blocks in use first
    (O(B * n) copy per call; reading the blocks in place is not built yet). The CUDA kernels refuse
    (automatic choice falls back); ``backend`` as in :func:`scaled_dot_product_attention`.
    """
    p = make_kvcache_problem(q, k_cache, v_cache, block_table is not None, causal, scale, window, alibi_slopes,
                             softcap)
    p.k, p.v, p.seqlens_k = kvcache.prepare(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    out, lse = dispatch.run(p, backend)
    return p.restore(out, lse) if return_lse else out
