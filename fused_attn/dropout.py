"""Dropout of the attention probabilities: one counter-based random stream for every backend.

A call with ``dropout_p > 0`` draws one 64-bit seed from torch's default generator
(:func:`draw_seed`; so ``torch.manual_seed`` reproduces the call) and hands it to the kernels
as an int64 tensor of shape (1,) (``Problem.dropout_seed``; a tensor, so torch.compile traces the
draw instead of specialising on its value). Nothing of size L x S is stored: the backward
regenerates the same keep/drop decision for each (query, key) pair from the seed.

The decision (every backend, the reference included, computes exactly this):

* element (b, h, i, j) of the (B, Hq, L, S) probability matrix (``varlen_attention``: b = 0
  and i, j the packed row indices) takes the 32-bit output number ``j % 4`` of Philox-4x32-10
  (Random123's; ``triton.language.philox``) with key ``(seed & 0xffffffff, seed >> 32)`` and
  counter ``(j // 4, i, b * Hq + h, 0)``: four neighbouring keys share one Philox call;
* it is dropped iff that output is below :func:`threshold` (``floor(p * 2**32)``, at most
  ``2**32 - 1``), kept otherwise, and a kept probability is multiplied by
  :func:`keep_scale` (``1 / (1 - p)``; 0 for ``p = 1``, which drops everything).

The forward's log-sum-exp is that of the probabilities before dropout (FlashAttention's).
:func:`keep_mask` builds the decision as a tensor: the reference backend applies it, and tests
use it to see which elements a kernel dropped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

PHILOX_ROUNDS = 10
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85        # Weyl increments of the key
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57    # round multipliers
KEYS_PER_CALL = 4  # the outputs of one Philox call: keys j = 4c .. 4c + 3 of a row
_U32 = 0xFFFFFFFF


def draw_seed() -> Tensor:
    """A fresh 63-bit seed (non-negative, as every backend reads it alike) from torch's default (CPU)
    generator, as an int64 tensor of shape (1,) (out of place, so torch.compile traces it)."""
    return torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64)


def threshold(p: float) -> int:
    """An element whose 32-bit random output is below this is dropped."""
    return min(int(p * 2.0 ** 32), _U32)


def keep_scale(p: float) -> float:
    """What a kept probability is multiplied by: 1 / (1 - p), 0 when everything is dropped."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor):
    """Philox-4x32-10 of the uint32 counters ``(c0, c1, c2, c3)`` (int64 tensors, broadcast) under
    the 64-bit ``seed``: its four uint32 outputs, as int64 tensors."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        p0, p2 = PHILOX_ROUND_B * c2, PHILOX_ROUND_A * c0  # < 2**64: products of two uint32, in int64 bits
        hi0 = (p0 >> 32) & _U32  # arithmetic shift of a possibly negative int64: masked to the high word
        hi2 = (p2 >> 32) & _U32
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, p0 & _U32, hi2 ^ c3 ^ k1, p2 & _U32
        k0, k1 = (k0 + PHILOX_KEY_A) & _U32, (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def keep_mask(seed: Tensor, p: float, B: int, H: int, L: int, S: int, row0: int = 0, col0: int = 0,
              device=None) -> Tensor:
    """The keep decision (True = kept) of elements (b, h, row0 + i, col0 + j) for i < L, j < S, as a
    boolean (B, H, L, S) tensor: what a kernel given ``seed`` (``draw_seed``'s tensor) does."""
    s = int(seed.reshape(-1)[0]) & 0xFFFFFFFFFFFFFFFF  # the key's 64 bits
    i = torch.arange(row0, row0 + L, dtype=torch.int64, device=device)[:, None]
    j = torch.arange(col0, col0 + S, dtype=torch.int64, device=device)[None, :]
    bh = torch.arange(B * H, dtype=torch.int64, device=device)[:, None, None]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    outs = philox(s, j // KEYS_PER_CALL, i, bh, zero)  # each (B*H, L, S)
    which = (j % KEYS_PER_CALL).expand_as(outs[0])
    r = torch.where(which == 0, outs[0], torch.where(which == 1, outs[1], torch.where(which == 2, outs[2], outs[3])))
    return (r >= threshold(p)).reshape(B, H, L, S)


def apply(probs: Tensor, p: float, seed: Optional[Tensor], row0: int = 0, col0: int = 0) -> Tensor:
    """``probs`` (B, H, L, S) after dropout with ``seed`` (drawn here when None): dropped elements 0,
    kept ones scaled by :func:`keep_scale`."""
    if p >= 1.0:
        return probs * 0.0  # zeros that keep the graph (gradients of zero, as torch's dropout gives)
    seed = draw_seed() if seed is None else seed
    B, H, L, S = probs.shape
    keep = keep_mask(seed, p, B, H, L, S, row0, col0, probs.device)
    return probs * keep * keep_scale(p)
