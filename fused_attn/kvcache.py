"""The cache side of :func:`fused_attn.attention_with_kvcache`: its arguments checked, the new keys and
values written into the cache in place, and a paged cache's blocks in logical order.

A contiguous cache is ``(B, Hk, S_max, E)``: batch b's keys 0 .. n-1 are its rows 0 .. n-1. A paged cache is
``(num_blocks, Hk, block_size, E)`` with a ``block_table`` of shape ``(B, max_blocks)``: batch b's key j
lives in block ``block_table[b, j // block_size]`` at row ``j % block_size`` (vLLM's and FlashAttention-2's
layout, heads before rows as in the rest of the package). Any strides with a unit last stride are read in
place; FlashAttention's ``(B, S, H, E)`` tensors pass as ``.transpose(1, 2)`` views.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .problem import _shape


def cache_lengths(cache_seqlens, B: int, capacity: int, device) -> List[int]:
    """``cache_seqlens`` (None: every batch's cache full, ``capacity`` keys; an int: the same for every
    batch; an int32 / int64 tensor of shape (B,) on ``device``) as B ints, each checked in [0, capacity]. A
    tensor is read once (one device sync on a GPU, as FlashAttention's Python checks do not; the checks need
    it)."""
    if cache_seqlens is None:
        return [capacity] * B
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lengths = [cache_seqlens] * B
    elif isinstance(cache_seqlens, Tensor) and cache_seqlens.dtype in (torch.int32, torch.int64) \
            and cache_seqlens.shape == (B,):
        if cache_seqlens.device != device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {device}")
        lengths = cache_seqlens.tolist()
    else:
        raise TypeError(f"cache_seqlens must be None, an int or an int32 / int64 tensor of shape ({B},), got "
                        + (f"{cache_seqlens.dtype} {_shape(cache_seqlens)}" if isinstance(cache_seqlens, Tensor)
                           else repr(cache_seqlens)))
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise ValueError(f"cache_seqlens[{b}] = {n} is not in [0, {capacity}] (the cache's capacity)")
    return lengths


def check_block_table(block_table: Tensor, B: int, num_blocks: int, device) -> None:
    """``block_table`` must be an int32 / int64 (B, max_blocks) tensor on ``device``."""
    if not (isinstance(block_table, Tensor) and block_table.dtype in (torch.int32, torch.int64)
            and block_table.dim() == 2 and block_table.shape[0] == B):
        raise TypeError(f"block_table must be an int32 / int64 tensor of shape ({B}, max_blocks), got "
                        + (f"{block_table.dtype} {_shape(block_table)}" if isinstance(block_table, Tensor)
                           else type(block_table).__name__))
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    if num_blocks == 0:
        raise ValueError("a paged cache needs at least one block, got k_cache with 0 blocks")


def _used_blocks(block_table: Tensor, counts: List[int], block_size: int, num_blocks: int) -> Tensor:
    """The table's first ceil(max count / block_size) columns (int64), checked where a batch uses them (entry
    in [0, num_blocks)); the entries a batch does not use become block 0 (read, never attended to)."""
    n_cols = -(-max(counts, default=0) // block_size)
    table = block_table[:, :n_cols].to(torch.int64)
    need = torch.tensor([-(-n // block_size) for n in counts], device=table.device)
    used = torch.arange(n_cols, device=table.device)[None, :] < need[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a block of the cache (0 .. "
                         f"{num_blocks - 1}), and batch {b} uses it")
    return torch.where(used, table, 0)


def append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, lengths: List[int],
           table: Optional[Tensor]) -> None:
    """Write new keys k (B, Hk, L_new, E) and values v (B, Hk, L_new, Ev) into the caches in place at each
    batch's positions lengths[b] .. lengths[b] + L_new - 1 (the caller checked they fit): a slice copy per
    batch entry; paged (``table``: each row's blocks, int64 (B, n_cols)), one indexed write of every position
    at its block and row (the models' paged cache appends through it too)."""
    L_new = k.shape[2]
    if table is None and k_cache.is_cpu:
        from .ops import cpu
        if cpu._C is not None:  # one call for both caches (per-call cost)
            cpu._C.append_kv(k_cache, v_cache, k, v, lengths)
            return
    if table is None:
        for b, n in enumerate(lengths):
            k_cache[b, :, n:n + L_new].copy_(k[b])
            v_cache[b, :, n:n + L_new].copy_(v[b])
        return
    size = k_cache.shape[2]
    pos = torch.tensor(lengths, device=table.device)[:, None] + torch.arange(L_new, device=table.device)  # (B, L_new)
    blocks, rows = table.gather(1, pos // size), pos % size
    k_cache[blocks, :, rows] = k.transpose(1, 2)  # (B, L_new, Hk, E): the indexed dims first
    v_cache[blocks, :, rows] = v.transpose(1, 2)


def check_new(k: Optional[Tensor], v: Optional[Tensor], k_cache: Tensor, v_cache: Tensor, B: int, paged: bool) -> int:
    """The new keys / values checked against the cache (both or neither; (B, Hk, L_new, E / Ev), the cache's
    dtype and device); their count L_new (0 without them)."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        raise ValueError("k and v come together: pass both new keys and new values, or neither")
    for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, Hk, L_new, head dim), got "
                             + (_shape(t) if isinstance(t, Tensor) else type(t).__name__))
        want = (B, cache.shape[1], t.shape[2], cache.shape[3])
        if tuple(t.shape) != want:
            what = "paged cache's" if paged else "cache's"
            raise ValueError(f"{name} must be (B, Hk, L_new, head dim) = ({B}, {cache.shape[1]}, L_new, "
                             f"{cache.shape[3]}) as the {what} heads and head dim, got {_shape(t)}")
        if t.dtype != cache.dtype or t.device != cache.device:
            raise TypeError(f"{name} must have its cache's dtype and device ({cache.dtype} on {cache.device}), got "
                            f"{t.dtype} on {t.device}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must hold as many new tokens, got {k.shape[2]} and {v.shape[2]}")
    return k.shape[2]


def gathered(cache: Tensor, table: Tensor) -> Tensor:
    """A paged cache's blocks (num_blocks, Hk, block_size, E) listed by ``table`` (B, n_cols), in logical order
    as one contiguous (B, Hk, n_cols * block_size, E) tensor (a copy of the used blocks)."""
    B, n_cols = table.shape
    _, H, size, E = cache.shape
    return cache[table].permute(0, 2, 1, 3, 4).reshape(B, H, n_cols * size, E)


def prepare(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor], cache_seqlens,
            block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The caches as the kernels read them (B, Hk, S, E / Ev) and each batch's key count (int64 (B,) on q's
    device), after appending k and v in place (fused_attn.attention_with_kvcache's steps before attention; q
    and the caches' shapes, dtypes and devices already checked by problem.make_kvcache_problem). Every check
    comes before the append: a refused call leaves the caches as they were."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise RuntimeError("attention_with_kvcache computes no gradients (as FlashAttention's "
                           "flash_attn_with_kvcache); call it under torch.no_grad(), or train with "
                           "scaled_dot_product_attention / varlen_attention")
    B = q.shape[0]
    paged = block_table is not None
    if paged:
        check_block_table(block_table, B, k_cache.shape[0], q.device)
        capacity = block_table.shape[1] * k_cache.shape[2]
    else:
        capacity = k_cache.shape[2]
    L_new = check_new(k, v, k_cache, v_cache, B, paged)
    lengths = cache_lengths(cache_seqlens, B, capacity, q.device)
    counts = [n + L_new for n in lengths]
    for b, n in enumerate(lengths):
        if n + L_new > capacity:
            raise ValueError(f"appending {L_new} tokens to batch {b}'s cache of {n} overflows its capacity of "
                             f"{capacity} ({'block_table columns x block_size' if paged else 'S_max'})")
    if isinstance(cache_seqlens, Tensor):  # (cheaper than building a tensor from the list)
        counts_t = cache_seqlens.to(torch.int64) + L_new if L_new else cache_seqlens.to(torch.int64)
    else:
        counts_t = torch.tensor(counts, dtype=torch.int64, device=q.device)
    if not paged:
        if L_new:
            append(k_cache, v_cache, k, v, lengths, None)
        return k_cache, v_cache, counts_t
    table = _used_blocks(block_table, counts, k_cache.shape[2], k_cache.shape[0])
    if L_new:
        append(k_cache, v_cache, k, v, lengths, table)
    return gathered(k_cache, table), gathered(v_cache, table), counts_t
