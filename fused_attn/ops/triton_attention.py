"""Triton fused attention, forward and backward (FlashAttention-2 algorithm).

Layout: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), any strides with a unit
stride on the last dim; out (B, Hq, L, Ev); lse (B, Hq, L), natural log: fp32 for fp16/bf16
inputs, fp64 for fp32 inputs (the autograd function hands callers an fp32 copy).
GQA/MQA: q head h reads kv head h // (Hq // Hk).
dtypes fp16, bf16, fp32 (fp32 dots are IEEE unless the user allowed TF32).
Head dims 1..256, padded inside the kernel to a power of two >= 16 by masked loads.

Forward: one program per (query block, batch * head) walks the key blocks with an
online softmax in fp32 (exp2, the scale folded into log2(e)), never forming L x S.
Which keys a query sees (below) leaves each row a range [lo_i, hi_i) of keys, both ends
non-decreasing in i, so a query block's first and last rows bound its key tiles
(_key_range): masked tiles where the range begins (the window's left edge, the key
bounds' begin), a run every row sees in full (no mask work), masked tiles where it ends
(the causal diagonal, the window's right edge, the key bounds' end, the ragged tail).
Tiles no row of the block sees are never visited. Saved for backward: out and lse.

Visibility: query i sees key j < S iff all of
- causal: j <= i + offset, offset 0 (upper-left, torch's is_causal) or S - L
  (lower-right, FlashAttention's);
- sliding window (FlashAttention-2's, aligned bottom-right whatever the causal mode):
  i + S - L - window_left <= j <= i + S - L + window_right, -1 dropping that side; the
  launcher passes it as offsets (window_offsets), a side no key lies beyond as an offset
  no key reaches past;
- key bounds: key_bounds[b, 0] <= j < key_bounds[b, 1] for the rows of batch b (an int64
  (B, 2) tensor, a key-padding mask normalised by make_problem; absolute key positions).
- a mask tensor (B, Hq, L, S), read through its strides (stride 0 on the dims it broadcasts,
  any stride on the keys): boolean, True where the query may attend, or additive float (fp32
  or the inputs' dtype), added to the scaled score (scale * q.k + mask; -inf hides the key,
  NaN makes the row NaN). No mask gradient (the dispatcher refuses a mask that requires grad).
- varlen (varlen_attention): the problem is one batch of packed sequences, int64 offsets
  cu_seqlens_q / cu_seqlens_k (n_seq + 1); row i of sequence s (rows [cu_q[s], cu_q[s + 1])) sees
  only keys [cu_k[s], cu_k[s + 1]), and within it, as local row and key of a sequence of L_s rows
  and S_s keys, the rules above with L_s and S_s for L and S (causal lower-right, the window
  aligned bottom-right per sequence; never with key bounds or a mask tensor). As FlashAttention-2:
  the grid's batch index runs over the sequences (grid (cdiv(max L_s, BLOCK), n_seq * heads)), so
  a query block (forward, dQ) or key block (dK/dV) lies inside one sequence; each program loads
  its sequence's offsets (_sequence), exits if its block starts past the sequence's end, moves its
  base pointers to the sequence's first row and key (the packed views' row strides) and runs the
  plain loops on local lengths, tiles and offsets. Every tile it visits holds its own sequence's
  keys only (the ragged last tile's keys past S_s are masked, never read). The launcher takes the
  longest sequences' lengths from the offsets (one device sync per launch, as make_varlen_problem
  already syncs to check them): they size the grid and the tuning key's length buckets. The
  forward takes the pointer path: a tensor descriptor clips only at the packed end, so a query
  block's store would write the next sequence's rows. Compile table, head dim 256 bf16 on sm_90: that
  pointer forward spills with BLOCK 64 x 64 (232 bytes; 64 x 32 does not) and dQ 8 bytes, which the
  prune does not yet know (it budgets the aligned forward for TMA there). Varlen with softcap, ALiBi and
  dropout at head dim 256 (compile table, tolerated as varlen rows are): bf16 forward 24 bytes on sm_90;
  fp32 forward 56 / 120 bytes (sm_80 / sm_90), dQ 8 / 32 (ptxas held it to 128 registers), dK/dV 0 / 8.
- stored keys (SEQLENS, forward only: attention_with_kvcache's cache lengths): an int64 (B,) tensor
  seqlens_k, batch b has keys [0, seqlens_k[b]) and the rest of its S are never read (a cache's
  unwritten slots); the causal diagonal (lower-right), the window and ALiBi align to that count. Each
  program loads its batch's count (_stored_keys) and runs on it as S, with the offsets passed relative
  to the bottom-right diagonal as varlen's; the pointer path only (a descriptor would load the slots
  past the count, whose NaN would reach P V as 0 * NaN); no mask tensor, key bounds or varlen with it.
- split-KV (SPLIT, forward only; flash-decoding): where a forward's programs would be fewer than the GPU's
  SMs over many keys (a decoding step, split_plan), axis 0 runs each row block n_split times, each on a
  chunk of whole key tiles (its key range clipped to [split * chunk, (split + 1) * chunk)), and stores its
  unnormalised acc and its rows' m and l (fp32) instead of out and lse; the launcher combines the chunks
  through their maxima (combine_splits, torch ops: exactly the epilogue's out and lse, in chunk order, so
  results stay deterministic for a given GPU). Not with varlen or dropout.
Each is a constexpr (CAUSAL, WINDOW, KEY_BOUNDS, MASK: 0 none, 1 bool, 2 float; VARLEN; SEQLENS; SPLIT; SOFTCAP,
ALIBI, DROPOUT, below): a call without it compiles none of its work. A row that sees no key gets out = 0
and lse = -inf; its gradients are 0, and a key no row sees gets dk = dv = 0.

Scores (_scores, the same code in all three kernels, so the backward recomputes the forward's scores
as the forward rounded them): x = scale * q.k; soft-capping (constexpr SOFTCAP, FlashAttention-2's) makes it
softcap * tanh(x / softcap), then ALiBi (ALIBI; alibi_slopes fp32 (B, Hq), varlen (n_seq, Hq) by
sequence) adds -slope * |i + S - L - j| (local rows, keys and lengths with varlen), then come the
visibility rules and the mask tensor. Neither changes which keys a query sees, so tiles are skipped
and masked as without them. tanh is _tanh (tl has none; libdevice's does not run in the interpreter):
1 - 2 / (2^(2|y| log2 e) + 1), no inf / inf for large |y|, and the Taylor series below |y| = 0.55,
where that form cancels; within 2 ulp of fp32 tanh. Backward: dS = P (dP - delta) times 1 - t^2,
t = tanh(x / softcap) recomputed with the scores; the fp32 top-key design below holds unchanged (its c
is in capped-score units), the dQ kernel also tracks each row's top key's 1 - t^2 for its swap.
Dropout (DROPOUT; fused_attn.dropout's stream, no L x S state: each tile regenerates its keep
decision, _dropout_keep, from the seed, one Philox-4x32-10 call per 4 keys of a row, interleaved
into key order; rows and keys are the packed ones with varlen, whose sequences' keys may start off
a multiple of 4: there each key picks its output from two calls, twice the Philox work). The
forward's l and lse are those of P before dropout (FlashAttention's), acc sums (P keep) V and
out = acc keep_scale / l; backward: dV = (P keep keep_scale)^T dO, dP = (dO V^T) keep keep_scale,
dS = P (dP - delta) with delta = rowsum(dO O) as without dropout (sum P = 1 still holds, so the top
key's c is unchanged too). The dK/dV kernel builds its keep tile as (queries, keys) and transposes
it. The threshold is compared unsigned (as int32 after adding -2^31 to both sides); the seed and
threshold are not specialised on (a call draws a new seed).

Mask tensors and tiles: the launcher first summarises the mask (mask_summary, torch ops over the
mask's stored values, once per forward and once per backward launch): a code per 16 x 16 cell
(MASK_CELL, the smallest block of any config) saying whether the mask leaves some score of the
cell visible and whether it changes any. Every tile the visibility rules above visit (with a mask,
also those they see in full) reads its cells (_mask_tile: (BLOCK_M / 16) x (BLOCK_N / 16) bytes):
a tile the mask hides entirely is skipped (no loads, no dots), one it leaves unchanged takes the
unmasked path, the rest load their mask tile and apply it to the log2-domain scores (bool: -inf
where False; float: + mask * log2(e)), then P = 0 wherever the score is -inf (so a hidden key is
never a row's top key below, and a row the mask hides entirely, lse -inf, gets P = 0, not NaN).
The summary ignores causal / window / key bounds: a tile whose mask hides exactly the keys the
visibility rules leave is applied, not skipped (right, only slower). Compiled, the tile skip is
a branch inside the key loop, which may keep Triton from pipelining that loop's loads: calls
without a mask do not have it.

Backward: delta = rowsum(dO * O) - dlse (the lse gradient enters here, since
d lse / d s = P); a dQ kernel per query block loops over key blocks, then a dK/dV kernel per
key block loops over the query blocks of every q head in its group (so GQA sums need no
atomics), visiting only the query tiles whose rows see some key of the block (_query_range: the
causal diagonal and window_right bound them below, window_left above; a block outside its batch's
key bounds visits none and stores zeros), masked where not every row sees every key; both
recompute P = exp2((s * log2e - hi) - lo), where hi + lo is
lse * log2e (_lse_log2). For fp32 inputs the forward joins its fp32 row max m (log2 units) and
ln l in an fp64 lse and the backward splits lse * log2e into fp32 hi and lo: at a row's largest
score s * log2e - hi is exact, so P = 1 / l to fp32 precision however large the scores (an fp32
lse is off by an ulp of itself, ~6e-5 at lse ~ 1e3, which made fp32 gradients hundreds of times
worse than plain PyTorch's: issue 12 item 1). Cost: a few fp64 operations per row per block.
For fp16/bf16 the lse stays fp32 and lo = 0 (P is rounded to 16 bits before its dots anyway).
dP - delta at a row's top key (fp32 inputs): delta = rowsum(dO * O) is summed in another order
than the kernels' dP, so in a row whose P is one-hot dS = P (dP - delta) at its top key j (largest
P, first on ties) came out a few ulps of dP instead of ~0, times |k| in dq and |q| in dk (dq 7-186x
plain PyTorch's error; tests/test_large_scores.py). Since sum P = 1, dP_j - delta equals
c = sum over keys i != j of P_i (dP_j - dP_i) + dlse, which has no such cancellation. The dQ
kernel keeps per row, as it walks the keys anyway (_top_update), the running top key (P, index,
dP), the sum of P over the keys so far and c over them (the top's own term is exactly 0; a new
top shifts c by (dP_new - dP_old) times that sum, which is below 1 - P_new, so nothing cancels).
It writes j (int32, -1 for a row that sees no key; always a key the row sees, since a masked key's P
is 0 and never becomes the top) and c + dlse (fp32) per row to O(L) scratch,
and swaps P c in for the P (dP - delta) its loop gave key j: dq += P_j (c - (dP_j - delta)) k_j
(what the loop added is a few ulps of dP times k; cancelling it leaves an ulp of that). The dK/dV
kernel, which runs after it, takes dS = P c wherever the key is its row's j. Cost: no extra
matmul (a separate pass computing c would cost 2 of the backward's 7: S and dP again); per key
tile the dQ kernel does a row max with index and three row sums, then one gather of BLOCK_M rows
of K; the dK/dV kernel a compare and select per score and two row loads per query tile (static
SASS on sm_80, head dims 64-256: dQ +16-21%, FFMAs +1%; dK/dV +0-8%).
fp16/bf16 inputs skip all of it (constexpr TOP_KEY): their P and dS are rounded to 16 bits
before the dots, far coarser than this.

Determinism: no atomics anywhere, so one config gives bitwise-identical results run after run.
Default (autotuned) mode: the first call with each tuning key times every config the prune keeps
and the process keeps the fastest, so calls in one process (one tuning cache) are bitwise
identical; another process may time differently, pick another config and sum in another order
(results then differ by rounding). With torch.use_deterministic_algorithms(True) nothing is
timed: each launch runs fixed_config, the first kept config for its (arch, kernel, dtype, head
dims, length bucket), so results are bitwise identical across processes and runs (same GPU
model, same Triton).

Grids: (row blocks, Y, Z), batch * heads (sequences * heads with VARLEN) spread over Y and Z, each
within CUDA's 65535.
Launch decisions (TMA or pointers, descriptors, configs and their prune, tuning key, grid) are
plain functions of the tensors and the target arch (forward_plan, backward_plan); device_arch
is the one place that asks the GPU, so tests fake an arch (tests/test_triton_launch.py).

Under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1) bf16 dot operands
are upcast to fp32 first, because the interpreter's bf16 tl.dot is wrong
(triton-lang/triton#11584); bf16 values are exact in fp32, so the results match
a bf16 tensor-core dot with fp32 accumulation. Compiled kernels never take it.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MIN_TRITON = (3, 6)  # host TensorDescriptor, in-kernel desc.load/store as used here: checked on 3.6 and 3.9


def triton_version_problem(version: str) -> Optional[str]:
    """Why Triton ``version`` cannot run these kernels (None: it can)."""
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if numbers < MIN_TRITON:
        return f"Triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest these kernels support"
    return None


if triton_version_problem(triton.__version__):  # the dispatcher reports an ImportError as the backend's refusal
    raise ImportError(triton_version_problem(triton.__version__))

from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from .. import dropout
from ..spec import AttnSpec, Capabilities, CausalMode
from ._common import allow_tf32, define_ops, last_dim_contiguous, new_output, saved_lse_dtype

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # for the kernels, which read module globals only as constexprs
_LN2 = tl.constexpr(LN2)
# Mask tensors (constexpr MASK): none, boolean (True = may attend), additive float.
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
# The mask summary (mask_summary) holds one code per MASK_CELL x MASK_CELL cell of (rows, keys): the
# smallest block of any config, so every tile is a whole number of cells. CELL_SEEN: the mask
# leaves some score of the cell visible; CELL_PLAIN: it changes none (bool all True, float all 0).
MASK_CELL = 16
CELL_SEEN, CELL_PLAIN = 1, 2
_MASK_CELL = tl.constexpr(MASK_CELL)
_MASK_BOOL = tl.constexpr(MASK_BOOL)
_CELL_SEEN = tl.constexpr(CELL_SEEN)
_CELL_PLAIN = tl.constexpr(CELL_PLAIN)
# _tanh: below this |y| the Taylor series (to y^15), above it 1 - 2 / (e^2y + 1): both within 2 ulp.
_TANH_SERIES = tl.constexpr(0.55)
_PHILOX_ROUNDS = tl.constexpr(dropout.PHILOX_ROUNDS)
_INT32_MIN = tl.constexpr(-2 ** 31)  # adding it (xor) maps uint32 order onto int32 order
# Per-call dropout scalars: not specialised (on divisibility by 16), which would compile a second variant
# of each kernel for one call in 16.
DROPOUT_SCALARS = ["seed", "drop_thr"]

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


INTERPRETED = not isinstance(_dot, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 was set before import


@triton.jit
def _program_block(HEADS, BLOCK: tl.constexpr):
    """(first row, batch * head) of this program. Grid (row blocks, Y, Z): CUDA allows 2**31 - 1
    programs on axis 0 but 65535 on axes 1 and 2, so the HEADS = batch * head slices spread over
    both as y + z * Y (see _grid); the last few programs past HEADS - 1 redo head HEADS - 1, which
    writes the same values. Row blocks vary fastest, so programs running together share one head's
    K and V (or Q and dO) in L2. The indices are special registers, free to re-read: folding all
    into axis 0 (a division by the row-block count) kept them live and spilled (compile table)."""
    bh = tl.minimum(tl.program_id(1) + tl.program_id(2) * tl.num_programs(1), HEADS - 1)
    return tl.program_id(0) * BLOCK, bh


@triton.jit
def _query_block(H, GROUP, HEADS, BLOCK_M: tl.constexpr):
    """This program's first query row, batch, q head and kv head."""
    start_m, bh = _program_block(HEADS, BLOCK_M)
    h = bh % H
    return start_m, (bh // H).to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)


@triton.jit
def _key_bounds(KB, b, S, KEY_BOUNDS: tl.constexpr):
    """Batch b's keys [key_lo, key_hi), clipped to [0, S): (KB[b, 0], KB[b, 1]) with KEY_BOUNDS, else (0, S)."""
    if KEY_BOUNDS:
        key_lo = tl.maximum(tl.load(KB + 2 * b), 0).to(tl.int32)
        key_hi = tl.minimum(tl.load(KB + 2 * b + 1), S).to(tl.int32)
    else:
        key_lo = 0
        key_hi = S
    return key_lo, key_hi


@triton.jit
def _sequence(CU_Q, CU_K, seq, causal_offset, window_lo, window_hi):
    """VARLEN: sequence ``seq``'s first query row and first key (int64), its lengths L and S, and its
    rows' (causal_offset, window_lo, window_hi): the launcher passes them relative to a sequence's
    bottom-right diagonal (see _visibility_args), so each gets S - L added."""
    q0 = tl.load(CU_Q + seq)
    k0 = tl.load(CU_K + seq)
    L = (tl.load(CU_Q + seq + 1) - q0).to(tl.int32)
    S = (tl.load(CU_K + seq + 1) - k0).to(tl.int32)
    diagonal = S - L
    return q0, k0, L, S, causal_offset + diagonal, window_lo + diagonal, window_hi + diagonal


@triton.jit
def _stored_keys(SL, b, L, S, causal_offset, window_lo, window_hi):
    """SEQLENS: batch b's key count (its S from here on, at most the tensor's) and its rows' (causal_offset,
    window_lo, window_hi), passed relative to the bottom-right diagonal as with VARLEN."""
    n = tl.minimum(tl.load(SL + b), S).to(tl.int32)
    diagonal = n - L
    return n, causal_offset + diagonal, window_lo + diagonal, window_hi + diagonal


@triton.jit
def _visible(i, j, S, causal_offset, window_lo, window_hi, key_lo, key_hi, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr):
    """Whether query row i sees key j (broadcast shapes, either orientation): j < S, inside the key
    bounds, causal j <= i + causal_offset, window i + window_lo <= j <= i + window_hi."""
    if KEY_BOUNDS:
        visible = (j >= key_lo) & (j < key_hi)  # key_hi <= S
    else:
        visible = j < S
    if CAUSAL:
        visible = visible & (j <= i + causal_offset)
    if WINDOW:
        visible = visible & (j >= i + window_lo) & (j <= i + window_hi)
    return visible


@triton.jit
def _key_range(start_m, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr):
    """The key tiles of BLOCK_N a query block visits, as (start, mid_lo, mid_hi, hi): masked tiles
    from start up to min(mid_lo, hi), unmasked ones (every row of the block sees every key of the
    tile) [mid_lo, mid_hi), masked ones [mid_hi, hi). Row i sees keys [lo_i, hi_i), both
    non-decreasing in i, so the block's first row gives where the keys some row sees begin and where
    those every row sees end, its last (real) row the others; tiles no row sees are never visited.
    Without WINDOW and KEY_BOUNDS, start = mid_lo = 0."""
    first = start_m
    last = tl.minimum(start_m + BLOCK_M, L) - 1
    hi_first = key_hi
    hi_last = key_hi
    if CAUSAL:
        hi_first = tl.minimum(hi_first, first + causal_offset + 1)
        hi_last = tl.minimum(hi_last, last + causal_offset + 1)
    if WINDOW:
        hi_first = tl.minimum(hi_first, first + window_hi + 1)
        hi_last = tl.minimum(hi_last, last + window_hi + 1)
    if WINDOW or KEY_BOUNDS:
        lo_first = key_lo
        lo_last = key_lo
        if WINDOW:
            lo_first = tl.maximum(lo_first, first + window_lo)
            lo_last = tl.maximum(lo_last, last + window_lo)
        start = lo_first // BLOCK_N * BLOCK_N
        mid_lo = tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, start)
        hi_last = tl.where(lo_first < hi_last, hi_last, 0)  # no row sees a key: not even start's tile
    else:
        start = 0
        mid_lo = 0
    mid_hi = tl.maximum(tl.maximum(hi_first, 0) // BLOCK_N * BLOCK_N, mid_lo)
    return start, mid_lo, mid_hi, hi_last


@triton.jit
def _query_range(start_n, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr):
    """The query tiles of BLOCK_M a key block visits, as _key_range's (start, mid_lo, mid_hi, hi):
    key j is seen by rows i >= j - causal_offset, i >= j - window_hi, i <= j - window_lo, 0 <= i < L
    (none outside the key bounds), so the block's first and last keys bound the rows. Rows past L
    load q = dO = 0 and add nothing, so the unmasked run may end in a ragged tile (mid_hi = L).
    A block partly outside the key bounds has no unmasked tile; one wholly outside, no tile."""
    first = start_n
    last = tl.minimum(start_n + BLOCK_N, S) - 1
    seen_first = first  # the keys of the block some row may see
    seen_last = last
    if KEY_BOUNDS:
        seen_first = tl.maximum(first, key_lo)
        seen_last = tl.minimum(last, key_hi - 1)
    if CAUSAL or WINDOW:
        lo = 0
        full_lo = 0
        if CAUSAL:
            lo = tl.maximum(seen_first - causal_offset, 0)
            full_lo = tl.maximum(last - causal_offset, 0)
        if WINDOW:
            lo = tl.maximum(lo, seen_first - window_hi)
            full_lo = tl.maximum(full_lo, last - window_hi)
        start = lo // BLOCK_M * BLOCK_M
        mid_lo = tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, start)
    else:
        start = 0
        mid_lo = 0
    if WINDOW or KEY_BOUNDS:
        hi = L
        full_hi = L
        if WINDOW:
            hi = tl.minimum(hi, seen_last - window_lo + 1)
            full_hi = tl.minimum(full_hi, first - window_lo + 1)
        if KEY_BOUNDS:
            hi = tl.where(seen_first <= seen_last, hi, 0)
            full_hi = tl.where((first >= key_lo) & (last < key_hi), full_hi, 0)
        if CAUSAL or WINDOW:
            hi = tl.where(lo < hi, hi, 0)  # no row sees a key: not even start's tile
        mid_hi = tl.maximum(tl.where(full_hi >= L, L, tl.maximum(full_hi, 0) // BLOCK_M * BLOCK_M), mid_lo)
    else:
        hi = L
        mid_hi = L
    return start, mid_lo, mid_hi, hi


@triton.jit
def _mask_tile(summary, stride_tm, stride_tn, start_m, start_n, L, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(visit, apply) for the tile of rows [start_m, start_m + BLOCK_M) and keys [start_n, start_n +
    BLOCK_N), from the mask summary's cells (``summary`` at this batch and head, see mask_summary):
    visit, the mask leaves some score visible (else the tile is skipped); apply, it changes some
    (else the tile takes the unmasked path). Cells past L or S count as unchanged."""
    cm = start_m // _MASK_CELL + tl.arange(0, BLOCK_M // _MASK_CELL)
    cn = start_n // _MASK_CELL + tl.arange(0, BLOCK_N // _MASK_CELL)
    inside = (cm[:, None] < tl.cdiv(L, _MASK_CELL)) & (cn[None, :] < tl.cdiv(S, _MASK_CELL))
    codes = tl.load(summary + cm.to(tl.int64)[:, None] * stride_tm + cn.to(tl.int64)[None, :] * stride_tn,
                    mask=inside, other=_CELL_PLAIN)
    visit = tl.max(tl.max(codes & _CELL_SEEN, 1), 0) != 0
    apply = tl.min(tl.min(codes & _CELL_PLAIN, 1), 0) == 0
    return visit, apply


@triton.jit
def _mask_scores(s, mask_base, stride_mm, stride_mn, i, j, L, S, MASK: tl.constexpr):
    """Scores ``s`` (log2 units) of rows i and keys j (broadcast shapes, either orientation) under the
    mask tensor: -inf where a boolean mask says False, + bias * log2(e) for a float one (-inf hides).
    Entries past L or S read as hidden."""
    ptrs = mask_base + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn
    inside = (i < L) & (j < S)
    if MASK == _MASK_BOOL:
        s = tl.where(tl.load(ptrs, mask=inside, other=0) != 0, s, float("-inf"))
    else:
        s = s + tl.load(ptrs, mask=inside, other=float("-inf")).to(tl.float32) * _LOG2E
    return s


@triton.jit
def _tanh(y):
    """tanh in fp32 within 2 ulp, from exp2 (tl has no tanh; libdevice's does not run in the
    interpreter): 1 - 2 / (2^(2|y| log2 e) + 1) where that has no cancellation (|y| >= TANH_SERIES,
    and no inf / inf: exp2 overflows to inf and gives 1), below it the Taylor series to y^15."""
    a = tl.abs(y)
    a2 = a * a
    series = -929569 / 638512875
    series = series * a2 + 21844 / 6081075
    series = series * a2 - 1382 / 155925
    series = series * a2 + 62 / 2835
    series = series * a2 - 17 / 315
    series = series * a2 + 2 / 15
    series = series * a2 - 1 / 3
    series = series * a2 + 1.0
    t = tl.where(a < _TANH_SERIES, a * series, 1.0 - 2.0 / (tl.math.exp2(a * (2 * _LOG2E)) + 1.0))
    return tl.where(y < 0, -t, t)


@triton.jit
def _scores(dot, i, j, diagonal, qk_scale, softcap_scale, softcap_log2, alibi_log2, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr):
    """Scores in log2 units of rows i and keys j (broadcast shapes, either orientation) from their
    dot products q.k: scale * q.k, with SOFTCAP softcap * tanh(scale * q.k / softcap) (softcap_scale =
    scale / softcap, softcap_log2 = softcap * log2(e)), then with ALIBI - slope * |i + diagonal - j|
    (alibi_log2 = slope * log2(e), diagonal = S - L). Also t = tanh(scale * q.k / softcap) (SOFTCAP;
    else unused), whose 1 - t^2 the backward's dS takes."""
    if SOFTCAP:
        t = _tanh(dot * softcap_scale)
        s = t * softcap_log2
    else:
        t = dot
        s = dot * qk_scale
    if ALIBI:
        s -= alibi_log2 * tl.abs(i + diagonal - j).to(tl.float32)
    return s, t


@triton.jit
def _philox_pick(shift, a0, a1, a2, a3, b0, b1, b2, W: tl.constexpr):
    """Output number shift + W (shift 0..3) of the Philox calls a (0..3) and the next ones b (4..6)."""
    if W == 0:
        return tl.where(shift == 0, a0, tl.where(shift == 1, a1, tl.where(shift == 2, a2, a3)))
    elif W == 1:
        return tl.where(shift == 0, a1, tl.where(shift == 1, a2, tl.where(shift == 2, a3, b0)))
    elif W == 2:
        return tl.where(shift == 0, a2, tl.where(shift == 1, a3, tl.where(shift == 2, b0, b1)))
    else:
        return tl.where(shift == 0, a3, tl.where(shift == 1, b0, tl.where(shift == 2, b1, b2)))


@triton.jit
def _dropout_keep(seed, drop_thr, bh, rows, first_key, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  KEYS_ALIGNED: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """The keep decision (fused_attn.dropout) of rows ``rows`` (stream rows: packed with VARLEN) and
    keys first_key + n of head slice ``bh`` = b * Hq + h, as a (BLOCK_M, BLOCK_N) tile, or with
    KEYS_FIRST (BLOCK_N, BLOCK_M) (the dK/dV kernel's orientation, built so, not transposed): output
    (j % 4) of philox(seed, j // 4, i, bh, 0) >= the threshold, compared unsigned (drop_thr =
    threshold - 2^31 against the output's bits - 2^31, as int32). Each call gives four neighbouring
    keys: with KEYS_ALIGNED (first_key % 4 == 0) one call per 4 keys, joined into key order; otherwise
    (VARLEN: a sequence's keys start anywhere) the calls of first_key // 4 + g and the next, and each
    key picks its output from them (twice the Philox work)."""
    groups = first_key // 4 + tl.arange(0, BLOCK_N // 4)
    if KEYS_FIRST:
        shape: tl.constexpr = (BLOCK_N // 4, BLOCK_M)
        c0 = tl.broadcast_to(groups[:, None], shape).to(tl.uint32)
        c1 = tl.broadcast_to(rows[None, :], shape).to(tl.uint32)
    else:
        shape: tl.constexpr = (BLOCK_M, BLOCK_N // 4)
        c0 = tl.broadcast_to(groups[None, :], shape).to(tl.uint32)
        c1 = tl.broadcast_to(rows[:, None], shape).to(tl.uint32)
    c2 = tl.full(shape, 0, tl.uint32) + bh.to(tl.uint32)
    c3 = tl.full(shape, 0, tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, _PHILOX_ROUNDS)
    if not KEYS_ALIGNED:
        shift = first_key % 4
        n0, n1, n2, _ = tl.philox(seed, c0 + 1, c1, c2, c3, _PHILOX_ROUNDS)
        r0, r1, r2, r3 = (_philox_pick(shift, r0, r1, r2, r3, n0, n1, n2, 0),
                          _philox_pick(shift, r0, r1, r2, r3, n0, n1, n2, 1),
                          _philox_pick(shift, r0, r1, r2, r3, n0, n1, n2, 2),
                          _philox_pick(shift, r0, r1, r2, r3, n0, n1, n2, 3))
    if KEYS_FIRST:  # [g, m, x, y] = output 2x + y, to key 4g + 2x + y
        r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
        r = tl.reshape(tl.permute(r, (0, 2, 3, 1)), (BLOCK_N, BLOCK_M))
    else:
        r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return (r.to(tl.int32, bitcast=True) ^ _INT32_MIN) >= drop_thr


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, start_m, offs_m, lo, hi, L, S,
               causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base, stride_mm, stride_mn, summary,
               stride_tm, stride_tn, qk_scale, softcap_scale, softcap_log2, alibi_log2, seed, drop_thr, drop_bh,
               drop_row0, drop_key0, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr,
               MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
               VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        visit = True
        apply = False
        if MASK:
            visit, apply = _mask_tile(summary, stride_tm, stride_tn, start_m, start_n, L, S, BLOCK_M, BLOCK_N)
        if visit:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, offs_m,
                                      start_n, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base,
                                      stride_mm, stride_mn, apply, qk_scale, softcap_scale, softcap_log2,
                                      alibi_log2, seed, drop_thr, drop_bh, drop_row0, drop_key0, HEAD_DIM, HEAD_DIM_V,
                                      BLOCK_D, BLOCK_DV, BLOCK_N, MASKED, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP,
                                      ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION, TMA)
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, offs_m, start_n, L, S,
              causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base, stride_mm, stride_mn, apply, qk_scale,
              softcap_scale, softcap_log2, alibi_log2, seed, drop_thr, drop_bh, drop_row0, drop_key0,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    """One key tile of the forward's online softmax. ``apply`` (with MASK): the mask tensor changes
    some score of the tile. With DROPOUT, l sums the probabilities before dropout and acc the kept
    ones (the caller scales by keep_scale / l)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:  # k_base, v_base are (B, Hk, S, E) descriptors: out-of-bounds rows and columns read as 0
        kt = tl.trans(k_base.load([b32, hk32, start_n, 0]).reshape([BLOCK_N, BLOCK_D]))
        v = v_base.load([b32, hk32, start_n, 0]).reshape([BLOCK_N, BLOCK_DV])
    else:
        kv_row = tl.cast(start_n, tl.int64)
        kt_ptrs = k_base + kv_row * stride_kn + tl.arange(0, BLOCK_N)[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + kv_row * stride_vn + tl.arange(0, BLOCK_N)[:, None] * stride_vn + offs_dv[None, :]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < S), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    qk = _dot(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    qk, _ = _scores(qk, offs_m[:, None], offs_n[None, :], S - L, qk_scale, softcap_scale, softcap_log2, alibi_log2,
                    SOFTCAP, ALIBI)
    if MASKED:
        visible = _visible(offs_m[:, None], offs_n[None, :], S, causal_offset, window_lo, window_hi, key_lo,
                           key_hi, CAUSAL, WINDOW, KEY_BOUNDS)
        qk = tl.where(visible, qk, float("-inf"))
    if MASK:
        if apply:
            qk = _mask_scores(qk, mask_base, stride_mm, stride_mn, offs_m[:, None], offs_n[None, :], L, S, MASK)
    if MASKED or MASK:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, drop_thr, drop_bh, drop_row0 + offs_m, drop_key0 + start_n, q.shape[0], BLOCK_N,
                             not VARLEN, False)
        p = tl.where(keep, p, 0.0)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def _fwd_kernel(Q, K, V, O, LSE, KB, M, MSUM, CU_Q, CU_K, AL, SL, PO, PM, PL,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                stride_mb, stride_mh, stride_mm, stride_mn, stride_tb, stride_th, stride_tm, stride_tn,
                H, GROUP, HEADS, L, S, causal_offset, window_lo, window_hi, qk_scale, softcap_scale, softcap_log2,
                seed, drop_thr, keep_scale, L_BUCKET, S_BUCKET, n_split, chunk,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr, TMA: tl.constexpr, ARCH: tl.constexpr, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr, SEQLENS: tl.constexpr = False, SPLIT: tl.constexpr = False):
    start_m, b, h, hk = _query_block(H, GROUP, HEADS, BLOCK_M)
    split = 0
    if SPLIT:  # axis 0 runs each row block's n_split key chunks (split-KV)
        split = (start_m // BLOCK_M) % n_split
        start_m = (start_m // BLOCK_M) // n_split * BLOCK_M
    rows_per_head = L  # of lse: the packed rows with VARLEN
    alibi_log2 = 0.0
    if ALIBI:  # this batch's (VARLEN: sequence's) slope of head h
        alibi_log2 = tl.load(AL + b * H + h) * _LOG2E
    drop_row0 = 0  # the dropout stream's row and key of the first query and key (VARLEN: the sequence's)
    drop_key0 = 0
    if VARLEN:  # the grid's batches are the sequences of the one packed batch: move to this one's rows
        q0, k0, L, S, causal_offset, window_lo, window_hi = _sequence(CU_Q, CU_K, b, causal_offset, window_lo,
                                                                      window_hi)
        if start_m >= L:
            return
        b = tl.zeros_like(b)
        Q += q0 * stride_qm
        K += k0 * stride_kn
        V += k0 * stride_vn
        if DROPOUT:
            drop_row0 = q0
            drop_key0 = k0
    if SEQLENS:  # a KV cache's count: this batch's keys, and the diagonals aligned to it
        S, causal_offset, window_lo, window_hi = _stored_keys(SL, b, L, S, causal_offset, window_lo, window_hi)
    drop_bh = b * H + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b32, h32, hk32 = b.to(tl.int32), h.to(tl.int32), hk.to(tl.int32)  # descriptor coordinates
    if TMA:  # Q, K, V, O are tensor descriptors (Hopper TMA): out-of-bounds reads give 0
        q = Q.load([b32, h32, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
        k_base = K
        v_base = V
    else:
        q_base = Q + b * stride_qb + h * stride_qh + tl.cast(start_m, tl.int64) * stride_qm
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    key_lo, key_hi = _key_bounds(KB, b, S, KEY_BOUNDS)
    start, mid_lo, mid_hi, hi = _key_range(start_m, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi,
                                           BLOCK_M, BLOCK_N, CAUSAL, WINDOW, KEY_BOUNDS)
    if SPLIT:  # this program's chunk of the keys, [split * chunk, (split + 1) * chunk): whole tiles
        c0 = split * chunk
        c1 = c0 + chunk
        start = tl.maximum(start, c0)
        mid_lo = tl.minimum(tl.maximum(mid_lo, c0), c1)
        mid_hi = tl.minimum(tl.maximum(mid_hi, c0), c1)
        hi = tl.minimum(hi, c1)
    mask_base = M + b * stride_mb + h * stride_mh
    summary = MSUM + b * stride_tb + h * stride_th
    if WINDOW or KEY_BOUNDS:  # masked tiles before the unmasked run
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, start_m, offs_m,
                                   start, tl.minimum(mid_lo, hi), L, S, causal_offset, window_lo, window_hi, key_lo,
                                   key_hi, mask_base, stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale,
                                   softcap_scale, softcap_log2, alibi_log2, seed, drop_thr, drop_bh, drop_row0,
                                   drop_key0, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL,
                                   WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, start_m, offs_m,
                               mid_lo, mid_hi, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base,
                               stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale,
                               softcap_log2, alibi_log2, seed, drop_thr, drop_bh, drop_row0, drop_key0, HEAD_DIM,
                               HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, False, CAUSAL, WINDOW, KEY_BOUNDS, MASK,
                               SOFTCAP, ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, b32, hk32, start_m, offs_m,
                               mid_hi, hi, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base,
                               stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale,
                               softcap_log2, alibi_log2, seed, drop_thr, drop_bh, drop_row0, drop_key0, HEAD_DIM,
                               HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOW, KEY_BOUNDS, MASK,
                               SOFTCAP, ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION, TMA)
    if SPLIT:  # the chunk's unnormalised acc and its rows' m (log2 units) and l, for combine_splits
        at = (split.to(tl.int64) * HEADS + b * H + h) * L + offs_m
        tl.store(PM + at, m_i, mask=offs_m < L)
        tl.store(PL + at, l_i, mask=offs_m < L)
        tl.store(PO + at[:, None] * HEAD_DIM_V + offs_dv[None, :], acc,
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V))
        return
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if DROPOUT:  # acc holds the kept probabilities' P V, l all of them
        out = acc * (keep_scale / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    # l = 0: the row saw no key, lse -inf. l NaN: a NaN score (lse NaN) or a +inf one (inf - inf;
    # lse +inf, its max). Out is NaN in both, through acc.
    unseen = tl.where(l_i == 0.0, float("-inf"), tl.where(m_i == float("inf"), float("inf"), float("nan")))
    if LSE.dtype.element_ty == tl.float64:  # fp32 inputs: m_i (exact, in log2 units) and ln l joined in fp64
        lse = tl.where(seen, m_i.to(tl.float64) * _LN2 + tl.log(l_safe.to(tl.float64)), unseen)
    else:
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, unseen)
    if VARLEN:  # moved here, not at the top: one offset lives through the loop, not two pointers
        O += q0 * stride_om
        LSE += q0
    if TMA:  # rows past L and columns past Ev are clipped by the descriptor
        O.store([b32, h32, start_m, 0], out.to(q.dtype).reshape([1, 1, BLOCK_M, BLOCK_DV]))
    else:
        o_base = O + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_om
        tl.store(o_base + rows[:, None] * stride_om + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + (b * H + h) * rows_per_head + offs_m, lse, mask=offs_m < L)


@triton.jit
def _lse_log2(ptrs, mask):
    """lse * log2(e) of the rows at ``ptrs`` as fp32 (hi, lo), for P = exp2((s * qk_scale - hi) - lo).
    An fp64 lse (fp32 inputs) splits into hi = fp32(t) and lo = fp32(t - hi), so that at a row's
    largest score, which the forward rounded to fp32 exactly as here, s * qk_scale - hi is exact and
    P = 1 / l to fp32 precision however large the scores. lo is 0 where t is +-inf (a row that sees
    no key keeps P = 0, an inf score row keeps today's P) and NaN only where hi is NaN.
    An fp32 lse (fp16/bf16 inputs, whose P is rounded to 16 bits anyway) gives lo = 0."""
    lse = tl.load(ptrs, mask=mask, other=0.0)
    if ptrs.dtype.element_ty == tl.float64:
        t = lse * _LOG2E
        hi = t.to(tl.float32)
        lo = tl.where(t == hi, 0.0, t - hi).to(tl.float32)
    else:
        hi = lse * _LOG2E
        lo = tl.zeros_like(hi)
    return hi, lo


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, TOP_C, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    H, HEADS, L, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr, TOP_KEY: tl.constexpr):
    """delta = rowsum(dO * O) - dlse per row; with TOP_KEY, dlse (0 without) into TOP_C, where the dQ
    kernel adds it to its top-key c."""
    start_m, bh = _program_block(HEADS, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_dv[None, :], mask=mask, other=0.0)
    row_ids = bh.to(tl.int64) * L + offs_m
    dlse = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DLSE:
        dlse = tl.load(DLSE + row_ids, mask=offs_m < L, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + row_ids, delta, mask=offs_m < L)
    if TOP_KEY:
        tl.store(TOP_C + row_ids, dlse, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base, stride_qm,
                    stride_dom, start_n, lo, hi, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base,
                    stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale, softcap_log2,
                    alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, dm_base,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr,
                    PRECISION: tl.constexpr, TOP_KEY: tl.constexpr, MASK_GRAD: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        visit = True
        apply = False
        if MASK:
            visit, apply = _mask_tile(summary, stride_tm, stride_tn, start_m, start_n, L, S, BLOCK_M, BLOCK_N)
        if visit:
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base,
                                    stride_qm, stride_dom, start_m, start_n, L, S, causal_offset, window_lo, window_hi,
                                    key_lo, key_hi, mask_base, stride_mm, stride_mn, apply, qk_scale, softcap_scale,
                                    softcap_log2, alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0,
                                    drop_key0, dm_base, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                                    MASKED, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN,
                                    DOT_FP32, PRECISION, TOP_KEY, MASK_GRAD)
    return dk, dv


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base, stride_qm,
                   stride_dom, start_m, start_n, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base,
                   stride_mm, stride_mn, apply, qk_scale, softcap_scale, softcap_log2, alibi_log2, seed, drop_thr,
                   keep_scale, drop_bh, drop_row0, drop_key0, dm_base, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                   TOP_KEY: tl.constexpr, MASK_GRAD: tl.constexpr):
    """One query tile's share of a key block's dK and dV (the tile held as keys x queries). ``apply``
    (with MASK): the mask tensor changes some score of the tile. With DROPOUT dV takes the kept P (the
    caller scales dV by keep_scale) and dP is (dO V^T) * keep * keep_scale. With MASK_GRAD the tile's dS
    (the gradient of the additive float mask: the score it is added to, after soft-capping) is stored at
    ``dm_base``, a (L, S) row-major fp32 plane."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    row0 = tl.cast(start_m, tl.int64)
    in_l = offs_m < L
    qt = tl.load(q_base + row0 * stride_qm + rows[None, :] * stride_qm + offs_d[:, None],
                 mask=(offs_d[:, None] < HEAD_DIM) & in_l[None, :], other=0.0)
    do = tl.load(do_base + row0 * stride_dom + rows[:, None] * stride_dom + offs_dv[None, :],
                 mask=in_l[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse_hi, lse_lo = _lse_log2(lse_base + offs_m, in_l)
    delta = tl.load(delta_base + offs_m, mask=in_l, other=0.0)
    # Rows past L load q = dO = 0, so they add nothing to dK or dV; keys past S are never stored.
    st = _dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_FP32, PRECISION)
    st, tt = _scores(st, offs_m[None, :], offs_n[:, None], S - L, qk_scale, softcap_scale, softcap_log2, alibi_log2,
                     SOFTCAP, ALIBI)
    if MASK:
        if apply:
            st = _mask_scores(st, mask_base, stride_mm, stride_mn, offs_m[None, :], offs_n[:, None], L, S, MASK)
    pt = tl.math.exp2((st - lse_hi[None, :]) - lse_lo[None, :])
    if MASKED:
        pt = tl.where(_visible(offs_m[None, :], offs_n[:, None], S, causal_offset, window_lo, window_hi, key_lo,
                               key_hi, CAUSAL, WINDOW, KEY_BOUNDS), pt, 0.0)
    if MASK:  # keys the mask hides, also in rows it hides entirely (lse -inf: exp2(-inf + inf) is NaN)
        pt = tl.where(st == float("-inf"), 0.0, pt)
    dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_FP32, PRECISION)
    if DROPOUT:  # the keep decision of element (query i, key j), as (keys, queries)
        keep = _dropout_keep(seed, drop_thr, drop_bh, drop_row0 + offs_m, drop_key0 + start_n, BLOCK_M, BLOCK_N,
                             not VARLEN, True)
        dv = _dot(tl.where(keep, pt, 0.0).to(do.dtype), do, dv, DOT_FP32, PRECISION)
        dpt = tl.where(keep, dpt * keep_scale, 0.0)
    else:
        dv = _dot(pt.to(do.dtype), do, dv, DOT_FP32, PRECISION)
    dst = pt * (dpt - delta[None, :])
    if TOP_KEY:  # at each row's top key, dP - delta is the dQ kernel's c (see _bwd_dq_kernel)
        top_j = tl.load(top_j_base + offs_m, mask=in_l, other=-1)
        top_c = tl.load(top_c_base + offs_m, mask=in_l, other=0.0)
        dst = tl.where(offs_n[:, None] == top_j[None, :], pt * top_c[None, :], dst)
    if MASK_GRAD:  # each (query, key) pair is visited once per head: plain stores
        tl.store(dm_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None], dst,
                 mask=in_l[None, :] & (offs_n[:, None] < S))
    if SOFTCAP:  # d(softcap tanh(x / softcap)) / dx
        dst *= 1.0 - tt * tt
    dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, DOT_FP32, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, TOP_J, TOP_C, KB, M, MSUM, CU_Q, CU_K, AL, DK, DV, DM,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_mb, stride_mh, stride_mm, stride_mn, stride_tb, stride_th, stride_tm, stride_tn,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     HK, GROUP, HEADS, L, S, causal_offset, window_lo, window_hi, qk_scale, sm_scale, softcap_scale,
                     softcap_log2, seed, drop_thr, keep_scale, L_BUCKET, S_BUCKET, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, VARLEN: tl.constexpr,
                     SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TOP_KEY: tl.constexpr,
                     MASK_GRAD: tl.constexpr, ARCH: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    start_n, bhk = _program_block(HEADS, BLOCK_N)
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    rows_per_head = L  # of lse, delta and the top keys: the packed rows with VARLEN
    H = HK * GROUP
    alibi_row = b  # ALIBI: this batch's (VARLEN: sequence's) row of slopes
    drop_row0 = 0  # the dropout stream's row and key of the first query and key (VARLEN: the sequence's)
    drop_key0 = 0
    if VARLEN:  # the grid's batches are the sequences of the one packed batch
        q0, k0, L, S, causal_offset, window_lo, window_hi = _sequence(CU_Q, CU_K, b, causal_offset, window_lo,
                                                                      window_hi)
        if start_n >= S:
            return
        b = tl.zeros_like(b)
        if DROPOUT:
            drop_row0 = q0
            drop_key0 = k0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row0 = tl.cast(start_n, tl.int64)
    if VARLEN:  # the block's first key in the packed keys; its query rows start at q0 (below). Two offsets
        row0 += k0  # live through the loops, not ten moved pointers (they spilled at head dim 256 on sm_80)
    in_s = offs_n < S
    k = tl.load(K + b * stride_kb + hk * stride_kh + row0 * stride_kn + cols[:, None] * stride_kn + offs_d[None, :],
                mask=in_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + row0 * stride_vn + cols[:, None] * stride_vn + offs_dv[None, :],
                mask=in_s[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    key_lo, key_hi = _key_bounds(KB, b, S, KEY_BOUNDS)
    start, mid_lo, mid_hi, hi = _query_range(start_n, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi,
                                             BLOCK_M, BLOCK_N, CAUSAL, WINDOW, KEY_BOUNDS)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        alibi_log2 = 0.0
        if ALIBI:
            alibi_log2 = tl.load(AL + alibi_row * H + h) * _LOG2E
        drop_bh = bh.to(tl.int32)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * rows_per_head
        delta_base = DELTA + bh * rows_per_head
        top_j_base = TOP_J + bh * rows_per_head
        top_c_base = TOP_C + bh * rows_per_head
        if VARLEN:
            q_base += q0 * stride_qm
            do_base += q0 * stride_dom
            lse_base += q0
            delta_base += q0
            top_j_base += q0
            top_c_base += q0
        mask_base = M + b * stride_mb + h * stride_mh
        summary = MSUM + b * stride_tb + h * stride_th
        dm_base = DM  # MASK_GRAD: dmask, (B, H, L, S) contiguous (never with VARLEN)
        if MASK_GRAD:
            dm_base += bh * L * S
        if CAUSAL or WINDOW or KEY_BOUNDS:  # masked tiles before the unmasked run
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base,
                                     stride_qm, stride_dom, start_n, start, tl.minimum(mid_lo, hi), L, S,
                                     causal_offset, window_lo, window_hi, key_lo, key_hi, mask_base, stride_mm,
                                     stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale, softcap_log2,
                                     alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, dm_base,
                                     HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOW,
                                     KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION, TOP_KEY,
                                     MASK_GRAD)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base,
                                 stride_qm, stride_dom, start_n, mid_lo, mid_hi, L, S, causal_offset, window_lo,
                                 window_hi, key_lo, key_hi, mask_base, stride_mm, stride_mn, summary, stride_tm,
                                 stride_tn, qk_scale, softcap_scale, softcap_log2, alibi_log2, seed, drop_thr,
                                 keep_scale, drop_bh, drop_row0, drop_key0, dm_base, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                 BLOCK_DV, BLOCK_M, BLOCK_N, False, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI,
                                 DROPOUT, VARLEN, DOT_FP32, PRECISION, TOP_KEY, MASK_GRAD)
        if WINDOW or KEY_BOUNDS:  # masked tiles after it (rows the window's left edge leaves out)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, top_j_base, top_c_base,
                                     stride_qm, stride_dom, start_n, mid_hi, hi, L, S, causal_offset, window_lo,
                                     window_hi, key_lo, key_hi, mask_base, stride_mm, stride_mn, summary, stride_tm,
                                     stride_tn, qk_scale, softcap_scale, softcap_log2, alibi_log2, seed, drop_thr,
                                     keep_scale, drop_bh, drop_row0, drop_key0, dm_base, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                     BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI,
                                     DROPOUT, VARLEN, DOT_FP32, PRECISION, TOP_KEY, MASK_GRAD)
    if DROPOUT:
        dv *= keep_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + row0 * stride_dkn + cols[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=in_s[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + hk * stride_dvh + row0 * stride_dvn + cols[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=in_s[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _top_update(top_p, top_j, top_dp, top_dcap, c, p_sum, p, dp, dcap, start_n, SOFTCAP: tl.constexpr):
    """Folds one key tile into each row's running top key (its P, index, dP and, with SOFTCAP, the
    softcap derivative dcap = 1 - t^2 there; the tile's first
    largest P takes over only if strictly larger, so ties keep the first key), c = sum over the keys
    so far of P_i (dP_top - dP_i) (the top's own term is exactly 0) and their sum of P. A new top
    shifts c by (dP_new - dP_old) * p_sum: no cancellation, since the keys so far sum to < 1 - P_new.
    Starting from top (0, -1, 0), a key with P = 0 never becomes the top."""
    tile_p, tile_j = tl.max(p, 1, return_indices=True, return_indices_tie_break_left=True)
    at_top = tl.arange(0, p.shape[1])[None, :] == tile_j[:, None]
    tile_dp = tl.sum(tl.where(at_top, dp, 0.0), 1)
    new = tile_p > top_p
    new_dp = tl.where(new, tile_dp, top_dp)
    if SOFTCAP:
        top_dcap = tl.where(new, tl.sum(tl.where(at_top, dcap, 0.0), 1), top_dcap)
    c += tl.where(new, (tile_dp - top_dp) * p_sum, 0.0) + tl.sum(p * (new_dp[:, None] - dp), 1)
    return (tl.where(new, tile_p, top_p), tl.where(new, start_n + tile_j, top_j), new_dp, top_dcap, c,
            p_sum + tl.sum(p, 1))


@triton.jit
def _bwd_dq_inner(dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base,
                  stride_kn, stride_vn, start_m, offs_m, lo, hi, L, S, causal_offset, window_lo, window_hi, key_lo,
                  key_hi, mask_base, stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale,
                  softcap_log2, alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                  ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, TOP_KEY: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        visit = True
        apply = False
        if MASK:
            visit, apply = _mask_tile(summary, stride_tm, stride_tn, start_m, start_n, L, S, BLOCK_M, BLOCK_N)
        if visit:
            dq, top_p, top_j, top_dp, top_dcap, c, p_sum = _bwd_dq_tile(
                dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base, stride_kn,
                stride_vn, offs_m, offs_d, offs_dv, cols, start_n, L, S, causal_offset, window_lo, window_hi, key_lo,
                key_hi, mask_base, stride_mm, stride_mn, apply, qk_scale, softcap_scale, softcap_log2, alibi_log2,
                seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                BLOCK_N, MASKED, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN, DOT_FP32, PRECISION,
                TOP_KEY)
    return dq, top_p, top_j, top_dp, top_dcap, c, p_sum


@triton.jit
def _bwd_dq_tile(dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base,
                 stride_kn, stride_vn, offs_m, offs_d, offs_dv, cols, start_n, L, S, causal_offset, window_lo,
                 window_hi, key_lo, key_hi, mask_base, stride_mm, stride_mn, apply, qk_scale, softcap_scale,
                 softcap_log2, alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 TOP_KEY: tl.constexpr):
    """One key tile's share of a query block's dQ (and its rows' top keys). ``apply`` (with MASK):
    the mask tensor changes some score of the tile. With DROPOUT dP is (dO V^T) * keep * keep_scale;
    with SOFTCAP dS is P (dP - delta) (1 - t^2)."""
    offs_n = start_n + cols
    row0 = tl.cast(start_n, tl.int64)
    if MASKED:
        in_s = offs_n < S
        kt = tl.load(k_base + row0 * stride_kn + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=(offs_d[:, None] < HEAD_DIM) & in_s[None, :], other=0.0)
        vt = tl.load(v_base + row0 * stride_vn + cols[None, :] * stride_vn + offs_dv[:, None],
                     mask=(offs_dv[:, None] < HEAD_DIM_V) & in_s[None, :], other=0.0)
    else:
        kt = tl.load(k_base + row0 * stride_kn + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        vt = tl.load(v_base + row0 * stride_vn + cols[None, :] * stride_vn + offs_dv[:, None],
                     mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
    s = _dot(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    s, t = _scores(s, offs_m[:, None], offs_n[None, :], S - L, qk_scale, softcap_scale, softcap_log2, alibi_log2,
                   SOFTCAP, ALIBI)
    if MASK:
        if apply:
            s = _mask_scores(s, mask_base, stride_mm, stride_mn, offs_m[:, None], offs_n[None, :], L, S, MASK)
    p = tl.math.exp2((s - lse_hi[:, None]) - lse_lo[:, None])
    if MASKED:
        visible = _visible(offs_m[:, None], offs_n[None, :], S, causal_offset, window_lo, window_hi, key_lo,
                           key_hi, CAUSAL, WINDOW, KEY_BOUNDS)
        p = tl.where(visible, p, 0.0)
    if MASK:  # keys the mask hides, also in rows it hides entirely (lse -inf: exp2(-inf + inf) is NaN)
        p = tl.where(s == float("-inf"), 0.0, p)
    dp = _dot(do, vt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, drop_thr, drop_bh, drop_row0 + offs_m, drop_key0 + start_n, q.shape[0], BLOCK_N,
                             not VARLEN, False)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    dcap = t
    if SOFTCAP:  # d(softcap tanh(x / softcap)) / dx
        dcap = 1.0 - t * t
    if TOP_KEY:
        seen_dp = dp
        if MASKED:  # a NaN or inf of v at a key the row cannot see stays out of c
            seen_dp = tl.where(visible, dp, 0.0)
        if MASK:  # nor one at a key the mask hides (P = 0 there, so it never becomes the top)
            seen_dp = tl.where(s == float("-inf"), 0.0, seen_dp)
        top_p, top_j, top_dp, top_dcap, c, p_sum = _top_update(top_p, top_j, top_dp, top_dcap, c, p_sum, p, seen_dp,
                                                               dcap, start_n, SOFTCAP)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds *= dcap
    dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, DOT_FP32, PRECISION)
    return dq, top_p, top_j, top_dp, top_dcap, c, p_sum


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, TOP_J, TOP_C, KB, M, MSUM, CU_Q, CU_K, AL, DQ,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_mb, stride_mh, stride_mm, stride_mn, stride_tb, stride_th, stride_tm, stride_tn,
                   stride_dqb, stride_dqh, stride_dqm,
                   H, GROUP, HEADS, L, S, causal_offset, window_lo, window_hi, qk_scale, sm_scale, softcap_scale,
                   softcap_log2, seed, drop_thr, keep_scale, L_BUCKET, S_BUCKET,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   KEY_BOUNDS: tl.constexpr, MASK: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr,
                   ALIBI: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, TOP_KEY: tl.constexpr, ARCH: tl.constexpr, DTYPE: tl.constexpr,
                   ALIGNED: tl.constexpr):
    start_m, b, h, hk = _query_block(H, GROUP, HEADS, BLOCK_M)
    rows_per_head = L  # of lse, delta and the top keys: the packed rows with VARLEN
    alibi_log2 = 0.0
    if ALIBI:  # this batch's (VARLEN: sequence's) slope of head h
        alibi_log2 = tl.load(AL + b * H + h) * _LOG2E
    drop_row0 = 0  # the dropout stream's row and key of the first query and key (VARLEN: the sequence's)
    drop_key0 = 0
    if VARLEN:  # the grid's batches are the sequences of the one packed batch: move to this one's rows
        q0, k0, L, S, causal_offset, window_lo, window_hi = _sequence(CU_Q, CU_K, b, causal_offset, window_lo,
                                                                      window_hi)
        if start_m >= L:
            return
        b = tl.zeros_like(b)
        Q += q0 * stride_qm
        DO += q0 * stride_dom
        K += k0 * stride_kn
        V += k0 * stride_vn
        LSE += q0
        DELTA += q0
        if DROPOUT:
            drop_row0 = q0
            drop_key0 = k0
    drop_bh = b * H + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row0 = tl.cast(start_m, tl.int64)
    in_l = offs_m < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + row0 * stride_qm + rows[:, None] * stride_qm + offs_d[None, :],
                mask=in_l[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row0 * stride_dom + rows[:, None] * stride_dom
                 + offs_dv[None, :], mask=in_l[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    row_ids = (b * H + h) * rows_per_head + offs_m
    lse_hi, lse_lo = _lse_log2(LSE + row_ids, in_l)
    delta = tl.load(DELTA + row_ids, mask=in_l, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    top_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    top_j = tl.full([BLOCK_M], -1, dtype=tl.int32)
    top_dp = tl.zeros([BLOCK_M], dtype=tl.float32)
    top_dcap = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_lo, key_hi = _key_bounds(KB, b, S, KEY_BOUNDS)
    start, mid_lo, mid_hi, hi = _key_range(start_m, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi,
                                           BLOCK_M, BLOCK_N, CAUSAL, WINDOW, KEY_BOUNDS)
    mask_base = M + b * stride_mb + h * stride_mh
    summary = MSUM + b * stride_tb + h * stride_th
    if WINDOW or KEY_BOUNDS:  # masked tiles before the unmasked run
        dq, top_p, top_j, top_dp, top_dcap, c, p_sum = _bwd_dq_inner(
            dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base, stride_kn,
            stride_vn, start_m, offs_m, start, tl.minimum(mid_lo, hi), L, S, causal_offset, window_lo, window_hi,
            key_lo, key_hi, mask_base, stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale,
            softcap_log2, alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, HEAD_DIM,
            HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI,
            DROPOUT, VARLEN, DOT_FP32, PRECISION, TOP_KEY)
    dq, top_p, top_j, top_dp, top_dcap, c, p_sum = _bwd_dq_inner(
        dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base, stride_kn,
        stride_vn, start_m, offs_m, mid_lo, mid_hi, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi,
        mask_base, stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale, softcap_log2,
        alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
        BLOCK_DV, BLOCK_M, BLOCK_N, False, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN,
        DOT_FP32, PRECISION, TOP_KEY)
    dq, top_p, top_j, top_dp, top_dcap, c, p_sum = _bwd_dq_inner(
        dq, top_p, top_j, top_dp, top_dcap, c, p_sum, q, do, lse_hi, lse_lo, delta, k_base, v_base, stride_kn,
        stride_vn, start_m, offs_m, mid_hi, hi, L, S, causal_offset, window_lo, window_hi, key_lo, key_hi,
        mask_base, stride_mm, stride_mn, summary, stride_tm, stride_tn, qk_scale, softcap_scale, softcap_log2,
        alibi_log2, seed, drop_thr, keep_scale, drop_bh, drop_row0, drop_key0, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
        BLOCK_DV, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOW, KEY_BOUNDS, MASK, SOFTCAP, ALIBI, DROPOUT, VARLEN,
        DOT_FP32, PRECISION, TOP_KEY)
    if TOP_KEY:
        # c = dP - delta at the top key without cancellation (sum over the keys of P (dP_top - dP)), plus
        # dlse, which the preprocess left in TOP_C; the dK/dV kernel reads the top key and c. The row
        # offsets come again from the program ids (free to re-read) rather than held through the loops
        # (row_ids spilled 8-16 bytes on sm_80).
        first, bh = _program_block(HEADS, BLOCK_M)
        if VARLEN:  # the packed batch's head, from the sequence's first row
            top_rows = ((bh % H).to(tl.int64) * rows_per_head + q0 + first) + rows
        else:
            top_rows = (bh.to(tl.int64) * rows_per_head + first) + rows
        c += tl.load(TOP_C + top_rows, mask=in_l, other=0.0)
        tl.store(TOP_J + top_rows, top_j, mask=in_l)
        tl.store(TOP_C + top_rows, c, mask=in_l)
        # The loop gave the top key dS = P (dP - delta); swap in P c. What it added, a few ulps of dP
        # times k, cancels here to an ulp of itself.
        found = top_j >= 0
        k_rows = k_base + top_j.to(tl.int64) * stride_kn
        k_top = tl.load(k_rows[:, None] + offs_d[None, :], mask=found[:, None] & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
        swap = top_p * (c - (top_dp - delta))
        if SOFTCAP:  # dS at the top key carries its 1 - t^2 as every dS
            swap *= top_dcap
        dq += tl.where(found, swap, 0.0)[:, None] * k_top
    if VARLEN:  # moved here, not at the top: one offset lives through the loops, not three pointers
        DQ += q0 * stride_dqm
    tl.store(DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqm + rows[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_l[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# Tuning: every config the kernels may run with, and the one rule that prunes them
# ---------------------------------------------------------------------------------------------

def _tma_block_shapes(nargs):
    """Config pre-hook: give the forward's tensor descriptors the config's tile shapes."""
    if isinstance(nargs.get("Q"), TensorDescriptor):
        bm, bn, bd, bdv = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"], nargs["BLOCK_DV"]
        for name, rows, cols in (("Q", bm, bd), ("K", bn, bd), ("V", bn, bdv), ("O", bm, bdv)):
            nargs[name].block_shape = [1, 1, rows, cols]


def _cfg(bm, bn, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg,
                         pre_hook=_tma_block_shapes)


# ptxas on sm_90 held these dK/dV configs to 128 registers and spilled (head dim 256: bf16 (16, 16, 8, 2) 8 bytes,
# fp32 (16, 16, 8, 1) with softcap and ALiBi 24 bytes; compile table); .maxnreg 255 lets it take what an 8-warp
# block allows, without spills.
FULL_REGISTERS = 255


# Configs by element size: 2 = fp16/bf16 on tensor cores, 4 = fp32 (IEEE fp32 dots run on FMA
# units and want small tiles). Each list was checked in the compile table (fused_attn/tools/triton_compile_table.py).
# Order matters: deterministic mode runs the first config the prune keeps (see fixed_config).
FWD_CONFIGS = {
    2: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3),
        _cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2)],
    4: [_cfg(32, 16, 4, 2), _cfg(16, 16, 4, 2)],
}
BWD_DKDV_CONFIGS = {
    # (16, 16, 8, 2): for head dim 256 with dropout, where (16, 32, 8, 2) spills 16 bytes (DROPOUT_REGISTER_SHARE)
    2: [_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 2), _cfg(16, 64, 8, 2), _cfg(16, 32, 8, 2),
        _cfg(16, 16, 8, 2, FULL_REGISTERS)],
    4: [_cfg(16, 32, 8, 2), _cfg(16, 16, 8, 1, FULL_REGISTERS)],
}
BWD_DQ_CONFIGS = {
    2: [_cfg(128, 32, 8, 3), _cfg(64, 32, 4, 3), _cfg(64, 32, 8, 2), _cfg(64, 16, 4, 2), _cfg(32, 16, 8, 2),
        _cfg(32, 16, 4, 2)],
    # fp32 runs the top-key tracking (TOP_KEY): (16, 16, 4, 2) spilled with it on sm_80 (head dim 96, 8 bytes)
    4: [_cfg(32, 16, 8, 2), _cfg(16, 16, 8, 2)],
}
CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": BWD_DKDV_CONFIGS, "dq": BWD_DQ_CONFIGS}
# The backward's preprocess (delta = rowsum(dO * O) - dlse) is memory-bound and not tuned.
PREPROCESS_CONFIG = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)
# The interpreter runs one small config, so small test shapes still cross many blocks.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}
# Whether the interpreter takes the forward's tensor-descriptor (Hopper TMA) path; tests run both.
INTERPRETER_TMA = False
# Oldest GPU the kernels run on (bf16 tensor cores, cp.async); hardware_refusal refuses older ones.
MIN_ARCH = 80
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            features=frozenset({"causal", "window", "key_padding", "bool_mask", "float_mask",
                                                "varlen", "softcap", "alibi", "dropout", "mask_grad", "seqlens_k"}),
                            device_note=": cpu under the Triton interpreter")
# Shared memory per block, in bytes, for each compute capability (10 * major + minor) from
# MIN_ARCH on; one missing here gets the smallest of them, SMEM_LIMIT_DEFAULT.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}
SMEM_LIMIT_DEFAULT = 99 * 1024
# Estimated tile values per thread (see _fits) above which ptxas spilled in the compile table.
REGISTER_BUDGET = {("fwd", 2): 160, ("dkdv", 2): 124, ("dq", 2): 128, ("fwd", 4): 100, ("dkdv", 4): 66,
                   ("dq", 4): 96}  # fp32 dq: (32, 16, 8, 2) at head dim 256 (100) spills with TOP_KEY on sm_80
# 16-bit dkdv: (32, 128, 8, 3) and (32, 64, 4, 3) at head dim 64 (estimate 128) spill 8 / 24 bytes on
# sm_80 since the dK/dV loop carries the window / key-bounds / mask offsets: 124 leaves them out.
# The varlen forward runs the pointer path (a TMA descriptor clips at the packed tensor's end, not
# at a sequence's) with the sequence's offsets live: this share of the budget (at head dim 256 bf16
# it keeps (64, 32, 8, 2), estimate 104, and leaves out (64, 64, 8, 2), 112, which spills on sm_90).
VARLEN_FWD_REGISTER_SHARE = 0.68
# Dropout's Philox keep tiles (10 rounds over a (rows, keys / 4) tile, joined into key order) take registers
# beside the tiles the estimate counts: with dropout 16-bit kernels get this share of the budget. Compile table
# with dropout, softcap and ALiBi (window, key bounds; head dims 64, 128, 256, sm_80 and sm_90, every config):
# forward configs of estimate 112 spilled (128 x 128 at head dim 64, 64 x 64 at 256), 104 did not; dK/dV ones
# of estimate 56 spilled (16 x 64 at head dim 64 on sm_80, 80 bytes), 52 did not; dQ's as without dropout.
DROPOUT_REGISTER_SHARE = {("fwd", 2): 0.68, ("dkdv", 2): 0.44}
# The float mask's gradient (MASK_GRAD: the dK/dV kernel stores each dS tile, its addresses beside the tiles the
# estimate counts): 16-bit dK/dV kernels get this share. Compile table (bf16 float mask, window-free, head dim 256,
# sm_80): (16, 32, 8, 2), estimate 100, spilled 16 bytes at the full budget.
MASK_GRAD_REGISTER_SHARE = {("dkdv", 2): 0.8}
# Inputs that are not 16-byte aligned (see _aligned) load element by element, an address and a
# value register each: their tiles get this share of the budget. Measured on sm_90's pointer
# path: fp16/bf16 head dims up to 128 then compile without spills; head dim 256 spills with every
# config (40 to 552 bytes), a known limitation of misaligned inputs.
MISALIGNED_REGISTER_SHARE = 0.5
# Hopper's wgmma and datacenter Blackwell's tcgen05 MMAs cover 64 rows per warpgroup: smaller
# forward query blocks fall back to mma.sync. Consumer Blackwell (sm_120) has mma.sync only.
WGMMA_MIN_BLOCK_M = 64


def smem_limit(arch: int) -> int:
    return SMEM_LIMIT.get(arch, SMEM_LIMIT_DEFAULT)


def _warpgroup_mma(arch: int) -> bool:
    return 90 <= arch < 120


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fits(kind: str, cfg: triton.Config, d: int, dv: int, elem: int, arch: int, aligned: bool,
          varlen: bool = False, dropout: bool = False, mask_grad: bool = False) -> bool:
    """Rough shared-memory and register estimates, calibrated on the compile table."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    threads = 32 * cfg.num_warps
    if kind == "fwd":  # q tile in registers, k/v tiles streamed; acc and s live in registers
        smem = (bm * d + cfg.num_stages * bn * (d + dv)) * elem
        regs = (bm * dv + bm * bn + bm * d * elem / 4) / threads
        if _warpgroup_mma(arch) and elem == 2 and bm < WGMMA_MIN_BLOCK_M:
            return False
    elif kind == "dkdv":  # k, v, dk, dv live in registers; q/do tiles streamed
        smem = cfg.num_stages * bm * (d + dv) * elem + bn * (d + dv) * elem
        regs = (bn * (d + dv) * (1 + elem / 4) + 2 * bn * bm) / threads
    else:  # dq: q, do, dq in registers; k/v tiles streamed
        smem = cfg.num_stages * bn * (d + dv) * elem + bm * (d + dv) * elem
        regs = (bm * d * (1 + elem / 4) + bm * dv * elem / 4 + 2 * bm * bn) / threads
    budget = REGISTER_BUDGET[kind, elem] * (1 if aligned else MISALIGNED_REGISTER_SHARE)
    shares = [VARLEN_FWD_REGISTER_SHARE if varlen and kind == "fwd" else 1.0,
              DROPOUT_REGISTER_SHARE.get((kind, elem), 1.0) if dropout else 1.0,
              MASK_GRAD_REGISTER_SHARE.get((kind, elem), 1.0) if mask_grad else 1.0]
    budget *= min(shares)  # each is extra state beside the estimated tiles: the largest need, not the product
    return smem <= smem_limit(arch) and regs <= budget


def prune_configs(kind: str, head_dim: int, head_dim_v: int, elem_bytes: int, arch: int,
                  length: Optional[int] = None, aligned: bool = True, varlen: bool = False,
                  dropout: bool = False, mask_grad: bool = False) -> List[triton.Config]:
    """The configs of ``kind`` ("fwd", "dkdv", "dq") worth trying for this head dim, dtype, arch and
    alignment, and, given the ``length`` the grid tiles (L; S for dkdv), no block far longer than
    it. Never empty; kept configs stay in their declared order."""
    configs = CONFIGS[kind][elem_bytes]
    d, dv = block_d(head_dim), block_d(head_dim_v)
    kept = [c for c in configs if _fits(kind, c, d, dv, elem_bytes, arch, aligned, varlen, dropout, mask_grad)]
    if not kept:  # never empty: fall back to the smallest tiles
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    if length is not None:
        tiled = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        short = [c for c in kept if c.kwargs[tiled] <= max(16, triton.next_power_of_2(length))]
        kept = short or [min(kept, key=lambda c: c.kwargs[tiled])]
    return kept


def fixed_config(kind: str, head_dim: int, head_dim_v: int, dtype: str, arch: int, length: int,
                 aligned: bool = True, varlen: bool = False, dropout: bool = False,
                 mask_grad: bool = False) -> triton.Config:
    """Deterministic mode's config: the first config, in declared order, that prune_configs keeps for
    this (kind, arch, dtype, head dims, length bucket, alignment). A pure function, so every process
    picks it."""
    return prune_configs(kind, head_dim, head_dim_v, ELEM_BYTES[dtype], arch, length, aligned, varlen, dropout,
                         mask_grad)[0]


# Autotune keys. Triton keys its tuning cache on these arguments' values plus the dtype of each
# argument that has one: tensor descriptors have none, and neither the arch nor the alignment is
# an argument. So the kernels take ARCH, DTYPE and ALIGNED as constexprs that only the key and the
# prune read (no extra compiles: the compiled code already depends on all three).
TUNING_KEY = {kind: ["ARCH", "DTYPE", "ALIGNED", "L_BUCKET", "S_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL",
                     "WINDOW", "KEY_BOUNDS", "MASK", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "PRECISION", "GROUP"]
              + (["TMA", "SEQLENS", "SPLIT"] if kind == "fwd" else []) + (["MASK_GRAD"] if kind == "dkdv" else [])
              for kind in CONFIGS}
TUNED_LENGTH = {"fwd": "L_BUCKET", "dkdv": "S_BUCKET", "dq": "L_BUCKET"}  # the bucket of the tiled length
DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _pointer_forward(constexprs: dict) -> bool:
    """Whether a launch's forward takes the pointer path where aligned inputs would take descriptors (VARLEN,
    SEQLENS): the prune's ``varlen`` budget (VARLEN_FWD_REGISTER_SHARE)."""
    return bool(constexprs.get("VARLEN") or constexprs.get("SEQLENS"))


def prune_hook(kind: str):
    """The autotuner's early_config_prune for ``kind``. It reads only keyword constexprs and the
    length bucket, never a tensor: on the TMA path Q, K, V and O are TensorDescriptors."""
    def prune(configs, named_args, **kwargs):
        return prune_configs(kind, kwargs["HEAD_DIM"], kwargs["HEAD_DIM_V"], ELEM_BYTES[kwargs["DTYPE"]],
                             kwargs["ARCH"], named_args[TUNED_LENGTH[kind]], kwargs["ALIGNED"],
                             _pointer_forward(kwargs), bool(kwargs.get("DROPOUT")), bool(kwargs.get("MASK_GRAD")))
    return prune


KERNELS = {"fwd": _fwd_kernel, "pre": _bwd_preprocess, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


def _autotuned(kind: str):
    configs = [c for by_size in CONFIGS[kind].values() for c in by_size]
    return triton.autotune(configs, key=TUNING_KEY[kind],
                           prune_configs_by={"early_config_prune": prune_hook(kind)})(KERNELS[kind])


# The interpreter has no autotuner: it runs INTERPRETER_BLOCKS.
AUTOTUNED = {} if INTERPRETED else {kind: _autotuned(kind) for kind in CONFIGS}


# ---------------------------------------------------------------------------------------------
# Launch plans: every launch decision, made by plain functions of the tensors and the target arch
# (the real launch and tests/test_triton_launch.py, which fakes the arch, go through them)
# ---------------------------------------------------------------------------------------------

MAX_GRID_X = 2 ** 31 - 1  # CUDA's grid limits: axis 0, and axes 1 and 2
MAX_GRID_YZ = 65535


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability 10 * major + minor of a CUDA device (80 = A100, 90 = H100); None off CUDA
    (the interpreter). The one place that asks the real device what it is."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@dataclass
class Launch:
    """One kernel launch, fully decided. ``config`` None: the autotuner picks among the configs
    that prune_hook keeps; otherwise exactly this config runs (deterministic mode, the interpreter,
    the untuned preprocess)."""
    kind: str  # "fwd", "pre", "dkdv", "dq": a key of KERNELS
    args: tuple  # positional arguments: tensors or descriptors, strides, sizes, scalars
    meta: dict  # constexpr keyword arguments, all but the config's block sizes
    grid: Callable[[dict], Tuple[int, int, int]]  # of the kernel's arguments and the config's block sizes
    config: Optional[triton.Config]

    def named_args(self) -> dict:
        return dict(zip(KERNELS[self.kind].arg_names, self.args))


def _grid(length: int, heads: int, block: str, repeat: int = 1) -> Callable[[dict], Tuple[int, int, int]]:
    """(row blocks, Y, Z): cdiv(length, meta[block]) row blocks on axis 0 (each ``repeat`` times: split-KV's
    chunks), and the ``heads`` (batch * head) slices as y + z * Y with Y, Z <= 65535 (Z = 1 up to 65535 heads;
    past that fewer than Z extra programs repeat the last head, see _program_block)."""
    z = triton.cdiv(heads, MAX_GRID_YZ)
    y = triton.cdiv(heads, z)

    def grid(meta):
        blocks = triton.cdiv(length, meta[block]) * repeat
        if blocks > MAX_GRID_X or z > MAX_GRID_YZ or heads > MAX_GRID_X:  # bh is an int32 in the kernels
            raise ValueError(f"fused_attn triton: {blocks} blocks of {meta[block]} rows x {heads} batch*heads "
                             f"exceed CUDA's grid ({MAX_GRID_X} x {MAX_GRID_YZ} x {MAX_GRID_YZ})")
        return (blocks, y, z)
    return grid


def _aligned(t: Tensor) -> bool:
    """A 16-byte aligned base and 16-byte multiple strides for the dims longer than 1 (the last is
    unit): TMA's requirement, and what lets every row load be 16-byte vectors."""
    return t.data_ptr() % 16 == 0 and (t.stride(-1) == 1 or t.shape[-1] == 1) and all(
        n == 1 or (st > 0 and st * t.element_size() % 16 == 0) for n, st in zip(t.shape[:-1], t.stride()[:-1]))


def use_tma(tensors, arch: Optional[int]) -> bool:
    """Tensor descriptors (TMA loads and stores) on sm_90 and newer (arch None, the interpreter:
    INTERPRETER_TMA) for fp16/bf16 (fp32's FMA-unit tiles spill with them), when every tensor is
    _aligned."""
    wanted = INTERPRETER_TMA if arch is None else arch >= 90
    return wanted and tensors[0].element_size() == 2 and all(_aligned(t) and t.stride(-1) == 1 for t in tensors)


def _descriptor(t: Tensor) -> TensorDescriptor:
    """A (B, H, rows, D) descriptor, its tile shape set per config by _tma_block_shapes. Dims of
    size 1 get a nominal aligned stride, which TMA checks but never uses."""
    strides = [st if n > 1 else t.shape[-1] * 16 for n, st in zip(t.shape, t.stride())]
    strides[-1] = 1
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, 16, block_d(t.shape[-1])])


def _modes(dtype: torch.dtype):
    """(DOT_FP32, PRECISION) constexprs for this dtype."""
    dot_fp32 = INTERPRETED and dtype == torch.bfloat16
    precision = "tf32" if dtype == torch.float32 and allow_tf32() else "ieee"
    return dot_fp32, precision


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


def _config(kind: str, meta: dict, arch: Optional[int], length: int, deterministic: bool) -> Optional[triton.Config]:
    if INTERPRETED:
        return triton.Config(dict(INTERPRETER_BLOCKS), pre_hook=_tma_block_shapes)
    if deterministic:
        return fixed_config(kind, meta["HEAD_DIM"], meta["HEAD_DIM_V"], meta["DTYPE"], arch, length, meta["ALIGNED"],
                            _pointer_forward(meta), bool(meta.get("DROPOUT")), bool(meta.get("MASK_GRAD")))
    return None


def window_offsets(spec: AttnSpec, L: int, S: int) -> Optional[Tuple[int, int]]:
    """(window_lo, window_hi): query i sees keys i + window_lo <= j <= i + window_hi under the
    sliding window; an unbounded side (-1, or a window side no key lies beyond: left >= S, right >= L)
    gets an offset no key reaches past (-L, S), so no sentinel nears int32 limits. None when neither
    side bounds anything (WINDOW off)."""
    left = spec.window_left if 0 <= spec.window_left < S else -1
    right = spec.window_right if 0 <= spec.window_right < L else -1
    if left < 0 and right < 0:
        return None
    return (S - L - left if left >= 0 else -L), (S - L + right if right >= 0 else S)


def _visibility_args(spec: AttnSpec, L: int, S: int, key_bounds: Optional[Tensor], B: int, unused: Tensor,
                     varlen: bool = False, seqlens: bool = False) -> Tuple[Tensor, Tuple[int, int, int], dict]:
    """The kernels' view of which keys a query sees: the key-bounds pointer (``unused``, any tensor, without
    key bounds), (causal_offset, window_lo, window_hi) and the constexprs CAUSAL, WINDOW, KEY_BOUNDS.
    With ``varlen`` (L, S the longest sequences' lengths) the offsets are relative to a sequence's
    bottom-right diagonal, S_s - L_s, which each program adds for its own (_sequence): the window's
    sides as window_offsets gives them for the longest lengths, minus S - L (an unbounded side then
    reaches no key of any sequence: -S - L_s + S_s <= -L_s, L + S_s - L_s >= S_s), and 0 for causal
    (lower-right, what make_varlen_problem builds). ``seqlens`` (stored keys, SEQLENS): the same, each
    batch's count for S_s (_stored_keys)."""
    if (varlen or seqlens) and (spec.causal is CausalMode.UPPER_LEFT or key_bounds is not None):
        what = "varlen sequences" if varlen else "stored key counts (seqlens_k)"
        raise ValueError(f"fused_attn triton: {what} take lower-right causal and no key bounds, got "
                         f"{spec.causal.name} causal{' and key bounds' if key_bounds is not None else ''}")
    window = window_offsets(spec, L, S)
    if key_bounds is not None and not (key_bounds.shape == (B, 2) and key_bounds.dtype == torch.int64
                                       and key_bounds.device == unused.device):
        raise ValueError(f"fused_attn triton: key_bounds must be an int64 ({B}, 2) tensor on {unused.device}, got "
                         f"{key_bounds.dtype} {tuple(key_bounds.shape)} on {key_bounds.device}")
    flags = dict(CAUSAL=spec.causal is not CausalMode.NONE, WINDOW=window is not None,
                 KEY_BOUNDS=key_bounds is not None)
    kb = key_bounds.contiguous() if key_bounds is not None else unused
    offsets = (spec.causal.offset(L, S), *(window or (-L, S)))
    if varlen or seqlens:
        offsets = tuple(offset - (S - L) for offset in offsets)
    return kb, offsets, flags


def _varlen_args(cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], B: int, L: int, S: int,
                 mask: Optional[Tensor], unused: Tensor) -> Tuple[Tensor, Tensor, int, int, int]:
    """The kernels' view of varlen sequences: the offsets' pointers (``unused``, any tensor, without
    them), the grid's batch count (the sequences) and the lengths the grid tiles (the longest
    sequence's rows and keys, read from the offsets: a device sync); without varlen B, L, S."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return unused, unused, B, L, S
    n_seq = cu_seqlens_q.numel() - 1
    if not (B == 1 and mask is None and cu_seqlens_k is not None and cu_seqlens_k.numel() == n_seq + 1
            and all(cu.dtype == torch.int64 and cu.device == unused.device for cu in (cu_seqlens_q, cu_seqlens_k))):
        raise ValueError(f"fused_attn triton: varlen sequences need one packed batch, no mask tensor and int64 "
                         f"cu_seqlens_q, cu_seqlens_k of one length on {unused.device}, got batch {B}, "
                         f"{'a' if mask is not None else 'no'} mask, cu_seqlens_q {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}, cu_seqlens_k "
                         f"{None if cu_seqlens_k is None else (cu_seqlens_k.dtype, tuple(cu_seqlens_k.shape))}")
    longest = [int(cu.diff().max()) if n_seq else 0 for cu in (cu_seqlens_q, cu_seqlens_k)]
    return cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), n_seq, *longest


def _seqlens_args(seqlens_k: Optional[Tensor], B: int, varlen: bool, mask: Optional[Tensor],
                  unused: Tensor) -> Tensor:
    """The forward's view of stored key counts: their pointer (``unused``, any tensor, without them), checked."""
    if seqlens_k is None:
        return unused
    if not (seqlens_k.shape == (B,) and seqlens_k.dtype == torch.int64 and seqlens_k.device == unused.device
            and not varlen and mask is None):
        raise ValueError(f"fused_attn triton: seqlens_k must be an int64 ({B},) tensor on {unused.device}, with no "
                         f"varlen sequences or mask tensor, got {seqlens_k.dtype} {tuple(seqlens_k.shape)} on "
                         f"{seqlens_k.device}{', varlen' if varlen else ''}{', a mask' if mask is not None else ''}")
    return seqlens_k.contiguous()


def mask_summary(mask: Tensor) -> Tensor:
    """The per-tile summary of a (B, H, L, S) mask tensor the kernels read (_mask_tile): a uint8 code per
    MASK_CELL x MASK_CELL cell of (rows, keys), CELL_SEEN where the mask leaves some score visible
    (bool True, float not -inf; NaN counts as visible), plus CELL_PLAIN where it changes none (bool
    True, float 0). Computed once per launch over the mask's stored values only: a dim the mask
    broadcasts (stride 0) is summarised once and the summary broadcasts it too, (B, H, cdiv(L, MASK_CELL),
    cdiv(S, MASK_CELL)) with stride 0 there. Rows and keys past L and S count as neither."""
    B, H, L, S = mask.shape
    stored = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    if mask.dtype == torch.bool:
        seen, plain = stored, stored
    else:
        seen, plain = stored != float("-inf"), stored == 0
    b, h, rows, keys = stored.shape
    cell_rows, cell_keys = (max(1, min(n, MASK_CELL)) for n in (rows, keys))  # a broadcast dim: one cell of one
    pad = (0, -keys % cell_keys, 0, -rows % cell_rows)
    cells = (b, h, -(-rows // cell_rows), cell_rows, -(-keys // cell_keys), cell_keys)
    any_seen = torch.nn.functional.pad(seen.to(torch.uint8), pad, value=0).reshape(cells).amax((3, 5))
    all_plain = torch.nn.functional.pad(plain.to(torch.uint8), pad, value=1).reshape(cells).amin((3, 5))
    codes = any_seen * CELL_SEEN + all_plain * CELL_PLAIN
    return codes.expand(B, H, -1, -1)


def _mask_args(mask: Optional[Tensor], B: int, H: int, L: int, S: int, unused: Tensor) -> Tuple[tuple, int]:
    """The kernels' view of a mask tensor: (mask, summary, the mask's 4 strides, the summary's 4) and the
    MASK constexpr; without a mask, ``unused`` (any tensor) for both pointers, zero strides, MASK_NONE."""
    if mask is None:
        return (unused, unused) + (0,) * 8, MASK_NONE
    if not (mask.shape == (B, H, L, S) and mask.device == unused.device
            and mask.dtype in (torch.bool, torch.float32, torch.float16, torch.bfloat16)):
        raise ValueError(f"fused_attn triton: mask must be a bool or float ({B}, {H}, {L}, {S}) tensor on "
                         f"{unused.device}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
    summary = mask_summary(mask)
    # A broadcast dim of one cell: stride 0, so any cell index reads it.
    summary_strides = tuple(0 if n == 1 else st for n, st in zip(summary.shape, summary.stride()))
    values = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return (values, summary, *values.stride(), *summary_strides), MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT


def _feature_args(spec: AttnSpec, alibi_slopes: Optional[Tensor], dropout_seed: Optional[Tensor], rows: int, H: int,
                  unused: Tensor) -> Tuple[Tensor, tuple, dict]:
    """The kernels' view of soft-capping, ALiBi and dropout: the slopes' pointer (``unused``, any tensor,
    without ALiBi; else fp32 (rows, H) contiguous, rows the batches or, varlen, the sequences), the scalars
    (softcap_scale, softcap_log2, seed, drop_thr, keep_scale) and the constexprs SOFTCAP, ALIBI, DROPOUT.
    drop_thr is dropout.threshold(p) - 2^31 (an int32, see _dropout_keep); the seed is
    ``int(dropout_seed[0])``, one host read of a CPU tensor."""
    if alibi_slopes is not None and not (alibi_slopes.shape == (rows, H) and alibi_slopes.dtype == torch.float32
                                         and alibi_slopes.device == unused.device and alibi_slopes.is_contiguous()):
        raise ValueError(f"fused_attn triton: alibi_slopes must be a contiguous float32 ({rows}, {H}) tensor on "
                         f"{unused.device}, got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)} on "
                         f"{alibi_slopes.device}{'' if alibi_slopes.is_contiguous() else ', not contiguous'}")
    drop = spec.dropout_p > 0.0
    if drop and not (dropout_seed is not None and dropout_seed.shape == (1,) and dropout_seed.dtype == torch.int64
                     and dropout_seed.device.type == "cpu"):
        raise ValueError("fused_attn triton: dropout_p > 0 needs dropout_seed, an int64 CPU tensor of shape (1,), got "
                         + ("None" if dropout_seed is None else f"{dropout_seed.dtype} {tuple(dropout_seed.shape)} on "
                            f"{dropout_seed.device}"))
    softcap = spec.softcap > 0.0
    scalars = (spec.scale / spec.softcap if softcap else 0.0, spec.softcap * LOG2E,
               int(dropout_seed[0]) if drop else 0, (dropout.threshold(spec.dropout_p) if drop else 0) - 2 ** 31,
               dropout.keep_scale(spec.dropout_p) if drop else 1.0)
    flags = dict(SOFTCAP=softcap, ALIBI=alibi_slopes is not None, DROPOUT=drop)
    return (alibi_slopes if alibi_slopes is not None else unused), scalars, flags


def _common_meta(q: Tensor, v: Tensor, flags: dict, arch: Optional[int], strided) -> dict:
    E, EV = q.shape[3], v.shape[3]
    dot_fp32, precision = _modes(q.dtype)
    return dict(HEAD_DIM=E, HEAD_DIM_V=EV, BLOCK_D=block_d(E), BLOCK_DV=block_d(EV), **flags,
                DOT_FP32=dot_fp32, PRECISION=precision, ARCH=arch or 0, DTYPE=DTYPE_NAME[q.dtype],
                ALIGNED=all(_aligned(t) for t in strided))


def forward_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, spec: AttnSpec,
                 arch: Optional[int], deterministic: bool = False, key_bounds: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                 cu_seqlens_k: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                 dropout_seed: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
                 split: Optional[Tuple[Tensor, Tensor, Tensor, int, int]] = None) -> Launch:
    """The forward's launch for unit-last-stride q, k, v and the outputs out, lse, on GPU ``arch``
    (None: the interpreter); ``key_bounds`` int64 (B, 2) or None; ``mask`` a bool or float (B, H, L, S)
    tensor (any strides) or None; ``cu_seqlens_q``, ``cu_seqlens_k`` int64 (n_seq + 1) offsets of
    packed sequences (B = 1) or None; ``alibi_slopes`` fp32 (B or n_seq, H) or None; ``dropout_seed``
    int64 (1,) on the CPU with spec.dropout_p > 0; ``seqlens_k`` int64 (B,), each batch's stored keys (SEQLENS),
    or None; ``split`` (split_plan): the chunks' partial acc, m and l (fp32 (n_split, B * H, L, Ev), (n_split,
    B * H, L) twice), n_split and chunk, or None. The grid tiles L (with varlen, the longest sequence's rows),
    n_split times with a split."""
    B, H, L, _ = q.shape
    HK, S = k.shape[1], k.shape[2]
    tensors = (q, k, v, out)
    cu_q, cu_k, grid_b, grid_l, grid_s = _varlen_args(cu_seqlens_q, cu_seqlens_k, B, L, S, mask, lse)
    varlen = cu_seqlens_q is not None
    stored = _seqlens_args(seqlens_k, B, varlen, mask, lse)
    kb, offsets, flags = _visibility_args(spec, grid_l, grid_s, key_bounds, B, lse, varlen, seqlens_k is not None)
    mask_args, flags["MASK"] = _mask_args(mask, B, H, L, S, lse)
    flags["VARLEN"] = varlen
    flags["SEQLENS"] = seqlens_k is not None
    flags["SPLIT"] = split is not None
    po, pm, pl, n_split, chunk = split if split is not None else (lse, lse, lse, 1, S)
    if split is not None and (varlen or spec.dropout_p > 0.0):
        raise ValueError("fused_attn triton: split-KV takes no varlen sequences or dropout")
    slopes, scalars, feature_flags = _feature_args(spec, alibi_slopes, dropout_seed, grid_b, H, lse)
    meta = _common_meta(q, v, {**flags, **feature_flags}, arch, tensors)
    # varlen and stored keys: see the module docstring
    meta["TMA"] = not varlen and seqlens_k is None and use_tma(tensors, arch)
    if meta["TMA"]:
        tensors = tuple(_descriptor(t) for t in tensors)
    args = (*tensors, lse, kb, *mask_args[:2], cu_q, cu_k, slopes, stored, po, pm, pl, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *mask_args[2:], H, H // HK, grid_b * H, L, S, *offsets, spec.scale * LOG2E, *scalars,
            _bucket(grid_l), _bucket(grid_s), n_split, chunk)
    return Launch("fwd", args, meta, _grid(grid_l, grid_b * H, "BLOCK_M", n_split),
                  _config("fwd", meta, arch, _bucket(grid_l), deterministic))


def uses_top_key(dtype: torch.dtype) -> bool:
    """Whether the backward gives each row's top key dS = P c (c summed without cancellation, see
    _bwd_dq_kernel): for fp32 inputs only; 16-bit ones round P and dS to 16 bits before their dots."""
    return dtype == torch.float32


def backward_plan(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  delta: Tensor, top_j: Optional[Tensor], top_c: Optional[Tensor], dq: Tensor, dk: Tensor,
                  dv: Tensor, spec: AttnSpec, arch: Optional[int], deterministic: bool = False,
                  key_bounds: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                  alibi_slopes: Optional[Tensor] = None, dropout_seed: Optional[Tensor] = None,
                  dmask: Optional[Tensor] = None) -> List[Launch]:
    """The backward's three launches, in order: preprocess (delta), dQ, dK/dV. For fp32 inputs
    (uses_top_key) the dQ kernel writes each row's top key and c to top_j (int32) and top_c (fp32),
    (B, H, L) each, which the dK/dV kernel reads; otherwise they are None (delta stands in). The
    preprocess works row by row on the packed rows whatever the sequences; dQ and dK/dV tile them as
    forward_plan. ``dmask``: the float mask's gradient, fp32 (B, H, L, S) contiguous and zero-filled
    (the dK/dV kernel writes the tiles it visits; MASK_GRAD), or None."""
    B, H, L, _ = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    top = uses_top_key(q.dtype)
    top_j, top_c = (top_j, top_c) if top else (delta, delta)  # unused pointers when TOP_KEY is off
    pre_config = triton.Config({"BLOCK_M": 32}) if INTERPRETED else PREPROCESS_CONFIG
    pre = Launch("pre", (out, dout, dlse if dlse is not None else lse, delta, top_c, *out.stride()[:3],
                         *dout.stride()[:3], H, B * H, L),
                 dict(HEAD_DIM_V=EV, BLOCK_DV=block_d(EV), HAS_DLSE=dlse is not None, TOP_KEY=top),
                 _grid(L, B * H, "BLOCK_M"), pre_config)
    cu_q, cu_k, grid_b, grid_l, grid_s = _varlen_args(cu_seqlens_q, cu_seqlens_k, B, L, S, mask, delta)
    varlen = cu_seqlens_q is not None
    kb, offsets, flags = _visibility_args(spec, grid_l, grid_s, key_bounds, B, delta, varlen)
    mask_args, flags["MASK"] = _mask_args(mask, B, H, L, S, delta)
    flags["VARLEN"] = varlen
    slopes, scalars, feature_flags = _feature_args(spec, alibi_slopes, dropout_seed, grid_b, H, delta)
    meta = _common_meta(q, v, {**flags, **feature_flags}, arch, (q, k, v, dout, dq, dk, dv))
    meta["TOP_KEY"] = top
    if dmask is not None and not (flags["MASK"] == MASK_FLOAT and dmask.shape == (B, H, L, S)
                                  and dmask.dtype == torch.float32 and dmask.is_contiguous()):
        raise ValueError(f"fused_attn triton: dmask must be a contiguous float32 ({B}, {H}, {L}, {S}) tensor beside a "
                         f"float mask, got {dmask.dtype} {tuple(dmask.shape)} with mask {flags['MASK']}")
    dkdv_meta = {**meta, "MASK_GRAD": dmask is not None}
    qk_scale, scale = spec.scale * LOG2E, spec.scale
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *mask_args[2:])
    buckets = (_bucket(grid_l), _bucket(grid_s))
    dq_launch = Launch("dq", (q, k, v, dout, lse, delta, top_j, top_c, kb, *mask_args[:2], cu_q, cu_k, slopes, dq,
                              *strides, *dq.stride()[:3], H, H // HK, grid_b * H, L, S, *offsets, qk_scale, scale,
                              *scalars, *buckets),
                       meta, _grid(grid_l, grid_b * H, "BLOCK_M"), _config("dq", meta, arch, buckets[0], deterministic))
    dkdv = Launch("dkdv", (q, k, v, dout, lse, delta, top_j, top_c, kb, *mask_args[:2], cu_q, cu_k, slopes, dk, dv,
                           dmask if dmask is not None else delta, *strides, *dk.stride()[:3], *dv.stride()[:3], HK,
                           H // HK, grid_b * HK, L, S, *offsets, qk_scale, scale, *scalars, *buckets),
                  dkdv_meta, _grid(grid_s, grid_b * HK, "BLOCK_N"),
                  _config("dkdv", dkdv_meta, arch, buckets[1], deterministic))
    return [pre, dq_launch, dkdv]


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# The interpreter patches triton.language module-wide while a kernel runs, so launches from
# concurrent Python threads break each other ("Did you forget to add @triton.jit?"): one at a time.
_INTERPRETER_LOCK = threading.Lock()
_IN_LAUNCH = threading.local()  # .patched: during one of our interpreted launches, the language modules patched


def _calls_inside_launches_skip_the_patch() -> None:
    """The interpreter patches triton.language again at every call of a nested @triton.jit function
    (InterpretedFunction.__call__: inspect.getmembers over three modules, ~2.5 ms): 40-50% of an
    interpreted launch of these kernels, which call a dozen helpers per tile. During our own launches
    (_run) a nested call patches only language modules (by the function's globals: triton.language,
    triton.language.core) not yet patched in this launch; patches stay until the launch ends, as
    Triton's own nested patches do. Any other call keeps Triton's behaviour, and a Triton without
    these internals is left alone."""
    from triton.runtime import interpreter
    cls = getattr(interpreter, "InterpretedFunction", None)
    if (cls is None or not hasattr(cls, "rewrite") or not hasattr(interpreter, "_patch_lang")
            or getattr(cls.__call__, "_fused_attn", False)):
        return
    patched_call = cls.__call__
    langs = (tl, tl.core)
    uses = {}  # function -> the ids of the language modules its globals hold

    def __call__(self, *args, **kwargs):
        patched = getattr(_IN_LAUNCH, "patched", None)
        if patched is None:
            return patched_call(self, *args, **kwargs)
        used = uses.get(self.fn)
        if used is None:
            used = uses[self.fn] = frozenset(id(m) for m in self.fn.__globals__.values()
                                             if any(m is lang for lang in langs))
        if not used <= patched:
            interpreter._patch_lang(self.fn)
            patched.update(used)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as Triton's: the error names the device function's failure
            raise interpreter.InterpreterError(repr(e)) from e

    __call__._fused_attn = True
    cls.__call__ = __call__


if INTERPRETED:
    _calls_inside_launches_skip_the_patch()


@contextlib.contextmanager
def _interpreted_launch():
    with _INTERPRETER_LOCK:
        _IN_LAUNCH.patched = {id(tl)}  # the launch patches what our kernels' module holds, triton.language
        try:
            yield
        finally:
            _IN_LAUNCH.patched = None


def _run(launch: Launch, device: torch.device) -> None:
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard, _interpreted_launch() if INTERPRETED else contextlib.nullcontext():
        if launch.config is None:
            AUTOTUNED[launch.kind][launch.grid](*launch.args, **launch.meta)
            return
        cfg = launch.config
        if cfg.pre_hook is not None:
            cfg.pre_hook({**launch.named_args(), **launch.meta, **cfg.kwargs})
        options = {} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}
        KERNELS[launch.kind][launch.grid](*launch.args, **launch.meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages, **options)


# Split-KV (SPLIT): a forward whose programs (row blocks of SPLIT_ROWS x batch x heads) are fewer than the
# GPU's SMs cuts its keys into chunks of at least SPLIT_MIN_KEYS, a multiple of SPLIT_CHUNK_ALIGN (every
# forward config's BLOCK_N divides it), up to MAX_SPLITS of them. The interpreter takes INTERPRETER_SMS.
SPLIT_MIN_KEYS = 512
SPLIT_CHUNK_ALIGN = 128
SPLIT_ROWS = 64
MAX_SPLITS = 16
INTERPRETER_SMS = 4


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS off CUDA (the interpreter, faked GPUs)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(B: int, H: int, L: int, S: int, sms: int, varlen: bool, dropout: bool) -> Tuple[int, int]:
    """(n_split, chunk): how many key chunks of ``chunk`` keys each row block's keys are cut into (1, S: none)."""
    programs = B * H * triton.cdiv(L, SPLIT_ROWS)
    if varlen or dropout or programs >= sms or S < 2 * SPLIT_MIN_KEYS:
        return 1, S
    n = min(triton.cdiv(sms, programs), S // SPLIT_MIN_KEYS, MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(S, n), SPLIT_CHUNK_ALIGN) * SPLIT_CHUNK_ALIGN
    return triton.cdiv(S, chunk), chunk


def combine_splits(po: Tensor, pm: Tensor, pl: Tensor, out: Tensor, lse: Tensor) -> None:
    """The forward's epilogue over split-KV's chunks: each row's chunks (fp32 acc (n, B * H, L, Ev), m in log2
    units and l (n, B * H, L)) rescaled to their largest m (chunks with l = 0 saw no key), in chunk order, into
    out (B, H, L, Ev) and lse (B, H, L): l = 0, out 0 and lse -inf; l NaN, NaN; m = +inf, lse +inf."""
    used = pl != 0.0  # (NaN counts)
    top = torch.where(used, pm, float("-inf")).amax(0)
    w = torch.where(used, torch.exp2(pm - top), 0.0)
    l = (pl * w).sum(0)
    acc = (po * w[..., None]).sum(0)
    seen = l > 0.0
    l_safe = torch.where(seen, l, 1.0)
    out.copy_((acc / l_safe[..., None]).reshape(out.shape))
    unseen = torch.where(l == 0.0, float("-inf"), torch.where(top == float("inf"), float("inf"), float("nan")))
    if lse.dtype == torch.float64:  # (fp32 inputs: as the kernel's, m and ln l joined in fp64)
        joined = top.double() * LN2 + torch.log(l_safe.double())
    else:
        joined = (top + torch.log2(l_safe)) * LN2
    lse.copy_(torch.where(seen, joined, unseen.to(joined.dtype)).reshape(lse.shape))


def _forward(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, key_bounds: Optional[Tensor] = None,
             mask: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
             cu_seqlens_k: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
             dropout_seed: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, _ = q.shape
    Ev = v.shape[3]
    out = new_output((B, H, L, Ev), q.dtype, q.device)
    lse = new_output((B, H, L), saved_lse_dtype(q.dtype), q.device)
    n_split, chunk = split_plan(B, H, L, k.shape[2], device_sms(q.device), cu_seqlens_q is not None,
                                spec.dropout_p > 0.0)
    split = None
    if n_split > 1:
        split = (new_output((n_split, B * H, L, Ev), torch.float32, q.device),
                 *(new_output((n_split, B * H, L), torch.float32, q.device) for _ in range(2)), n_split, chunk)
    launch = forward_plan(q, k, v, out, lse, spec, device_arch(q.device),
                          torch.are_deterministic_algorithms_enabled(), key_bounds, mask, cu_seqlens_q, cu_seqlens_k,
                          alibi_slopes, dropout_seed, seqlens_k, split)
    _run(launch, q.device)
    if split is not None:
        combine_splits(*split[:3], out, lse)
    return out, lse


def _backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              spec: AttnSpec, mask_grad: bool = False, key_bounds: Optional[Tensor] = None,
              mask: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
              cu_seqlens_k: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
              dropout_seed: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """(dq, dk, dv), and with ``mask_grad`` the float mask's gradient (B, H, L, S) in its dtype too. Stored key
    counts (seqlens_k: attention_with_kvcache, which computes no gradients) have no backward here."""
    if seqlens_k is not None:
        raise ValueError("fused_attn triton: seqlens_k (stored key counts) has no backward")
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    B, H, L, _ = q.shape
    delta = new_output((B, H, L), torch.float32, q.device)
    top = uses_top_key(q.dtype)
    top_j = torch.empty((B, H, L), dtype=torch.int32, device=q.device) if top else None
    top_c = new_output((B, H, L), torch.float32, q.device) if top else None
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    # the dK/dV kernel writes dS where it visits; the rest (skipped tiles) is zero
    dmask = torch.zeros(mask.shape, dtype=torch.float32, device=q.device) if mask_grad else None
    launches = backward_plan(dout, dlse.contiguous() if dlse is not None else None, q, k, v, out, lse.contiguous(),
                             delta, top_j, top_c, dq, dk, dv, spec, device_arch(q.device),
                             torch.are_deterministic_algorithms_enabled(), key_bounds, mask, cu_seqlens_q,
                             cu_seqlens_k, alibi_slopes, dropout_seed, dmask)
    for launch in launches:
        _run(launch, q.device)
    return (dq, dk, dv) if dmask is None else (dq, dk, dv, dmask.to(mask.dtype))


# ---------------------------------------------------------------------------------------------
# torch.library ops and the dispatcher's interface
# ---------------------------------------------------------------------------------------------

forward, backward = define_ops("triton", __name__, ("cpu", "cuda"), saved_lse_dtype)


def hardware_refusal(p, explicit: bool) -> Optional[str]:
    """Why this GPU or process cannot run problem ``p`` beyond what CAPABILITIES says (None: it can)."""
    if p.device.type == "cuda":
        if INTERPRETED:
            return "TRITON_INTERPRET=1 is set, so the kernels can only run on CPU tensors"
        arch = device_arch(p.device)
        if arch < MIN_ARCH:
            return f"compute capability {arch // 10}.{arch % 10} is older than {MIN_ARCH // 10}.{MIN_ARCH % 10} (Ampere)"
        return None
    if not INTERPRETED:
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 set before import)"
    if not explicit:
        return "the Triton interpreter is a test vehicle: ask for backend='triton' by name to use it"
    return None
