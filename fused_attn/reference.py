"""The naive PyTorch attention that every kernel is checked against.

This is the project's single oracle: tests, benchmarks, the ``"reference"``
backend and the models' fallback all call :func:`attention` (:func:`varlen_attention`
calls it once per packed sequence, :func:`cached_attention` once per batch entry); nobody rewrites it.

It materialises the full ``(B, H, L, S)`` score matrix on purpose. Numerics:

* computes in ``compute_dtype`` (default: the inputs' dtype); pass
  ``torch.float64`` for an oracle, ``torch.float32`` for an accurate fallback;
* a query row that sees no key at all (a fully masked row, or lower-right causal
  with ``L > S``) gets a zero output, a log-sum-exp of ``-inf`` and zero
  gradients, as FlashAttention does (torch's math path gives NaN for some of
  these);
* the log-sum-exp is the natural log of the row's sum of ``exp(scale * q.k)``
  over the keys it sees, and is differentiable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dropout
from .spec import AttnSpec, CausalMode, causal_mask, visible_keys  # noqa: F401 (tests use causal_mask)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    causal: CausalMode = CausalMode.NONE,
    scale: Optional[float] = None,
    *,
    window: Tuple[int, int] = (-1, -1),
    key_bounds: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    dropout_origin: Tuple[int, int] = (0, 0),
    compute_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Naive attention on canonical inputs.

    q: (B, Hq, L, E); k: (B, Hk, S, E); v: (B, Hk, S, Ev) with ``Hq % Hk == 0``
    (head i of q uses kv head ``i // (Hq // Hk)``). ``attn_mask``: boolean (True =
    may attend) or additive float, broadcastable to (B, Hq, L, S); it combines
    with ``causal``, the sliding ``window`` (left, right; ``AttnSpec``'s) and the per-batch
    ``key_bounds`` ((B, 2): batch b sees keys [begin, end) only). ``alibi_slopes`` (B or 1, Hq):
    ``-slope * |i + S - L - j|`` added to the scaled scores; ``softcap > 0`` caps the scaled scores
    as ``softcap * tanh(x / softcap)`` first. ``dropout_p > 0`` drops the probabilities as
    ``fused_attn.dropout`` says for ``dropout_seed`` (drawn from torch's generator when None), with
    this call's rows and keys at ``dropout_origin`` (row, key) of the stream. Returns ``(out (B, Hq, L, Ev), lse (B, Hq, L))`` in
    ``compute_dtype``.
    """
    dt = compute_dtype or q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    L, S = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, S)
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(L, device=q.device)[:, None] + (S - L)
        j = torch.arange(S, device=q.device)[None, :]
        s = s - alibi_slopes.to(dt)[:, :, None, None] * (i - j).abs().to(dt)
    spec = AttnSpec(scale=scale, causal=CausalMode(causal), window_left=window[0], window_right=window[1])
    allowed = visible_keys(L, S, spec, key_bounds, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else attn_mask & allowed
        else:
            s = s + attn_mask.to(dt)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # A constant shift per row leaves softmax and lse unchanged; detaching it keeps
    # the graph free of the inf - inf of rows that see nothing.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    seen = denom > 0
    safe = torch.where(seen, denom, torch.ones_like(denom))
    p = e / safe
    # A row that sees no key: lse -inf, out 0 (but 0 * NaN where v holds a NaN: the dense P V of
    # torch's math path). A row whose scores hold a NaN: denom is NaN, and so are lse and out.
    empty = denom == 0
    lse = torch.where(seen, torch.log(safe) + m, torch.full_like(m, float("-inf")).masked_fill(~empty, float("nan")))
    if dropout_p > 0.0:
        p = dropout.apply(p, dropout_p, dropout_seed, *dropout_origin)
    out = torch.matmul(p, v)
    return out, lse.squeeze(-1)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    dropout_p: float = 0.0,
    causal: CausalMode = CausalMode.NONE,
    scale: Optional[float] = None,
    *,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Variable-length sequences packed along the rows: q (1, Hq, total_q, E), k, v (1, Hk, total_k,
    E / Ev); sequence b is query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) against key rows
    [cu_seqlens_k[b], cu_seqlens_k[b + 1]), each computed by :func:`attention` on its own (causal
    and window aligned within the sequence; ``alibi_slopes`` (n_seq, Hq), row b the sequence's; dropout
    at the packed rows and keys). Returns ``(out (1, Hq, total_q, Ev), lse (1, Hq, total_q))``."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dt = compute_dtype or q.dtype
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = dropout.draw_seed()  # one stream for all the sequences
    outs, lses = [], []
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:  # no query, or no key: zeros, lse -inf
            n = cq[b + 1] - cq[b]
            outs.append(q.new_zeros((1, q.shape[1], n, v.shape[3]), dtype=dt))
            lses.append(q.new_full((1, q.shape[1], n), float("-inf"), dtype=dt))
            continue
        o, l_ = attention(q[:, :, cq[b]:cq[b + 1]], k[:, :, ck[b]:ck[b + 1]], v[:, :, ck[b]:ck[b + 1]], None,
                          dropout_p, causal, scale, window=window,
                          alibi_slopes=None if alibi_slopes is None else alibi_slopes[b:b + 1],
                          softcap=softcap, dropout_seed=dropout_seed, dropout_origin=(cq[b], ck[b]),
                          compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l_)
    if not outs:
        return q.new_zeros(q.shape[:3] + v.shape[3:], dtype=dt), q.new_zeros(q.shape[:3], dtype=dt)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, seqlens_k: Tensor, causal: CausalMode = CausalMode.NONE,
                     scale: Optional[float] = None, *, window: Tuple[int, int] = (-1, -1),
                     alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                     compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Batch entry b attends to its first ``seqlens_k[b]`` keys only (a KV cache's filled slots; the others
    are never read), each computed by :func:`attention` on its own: causal, window and ALiBi aligned to
    that entry's key count. q (B, Hq, L, E), k, v (B, Hk, S, E / Ev); ``alibi_slopes`` (B, Hq). Returns
    ``(out (B, Hq, L, Ev), lse (B, Hq, L))``."""
    dt = compute_dtype or q.dtype
    outs, lses = [], []
    for b, n in enumerate(seqlens_k.tolist()):
        if n == 0:  # no key: zeros, lse -inf
            outs.append(q.new_zeros((1, q.shape[1], q.shape[2], v.shape[3]), dtype=dt))
            lses.append(q.new_full((1, q.shape[1], q.shape[2]), float("-inf"), dtype=dt))
            continue
        o, l_ = attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None, 0.0, causal, scale, window=window,
                          alibi_slopes=None if alibi_slopes is None else alibi_slopes[b:b + 1], softcap=softcap,
                          compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs), torch.cat(lses)
