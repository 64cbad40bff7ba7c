"""Input checks and canonicalisation shared by every backend.

The public functions accept torch's SDPA shapes ``(N..., L, E)`` (rank >= 2, ranks may
differ). Everything below works on the canonical 4-D form ``(B, H, L, E)``: all leading
batch dims (broadcast between q, k and v, as torch does) are folded into B, the
dim before L is the head dim H (a rank-2 input has B = H = 1; a rank-3 input
``(N, L, E)`` has B = 1, H = N, which is what torch's ``enable_gqa`` assumes). Key and
value keep their own head count Hk (Hq % Hk == 0: query head h reads kv head
h // (Hq // Hk)), so GQA and a kv head broadcast over the query heads copy nothing.
No data is copied for 3-D and 4-D inputs whose batch dims agree.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import dropout
from .ops._common import lse_dtype
from .spec import TENSOR_ARGS, AttnSpec, CausalMode

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NO_WINDOW = (-1, -1)  # the public functions' default window: known valid (checked by identity, per-call cost)


@dataclass
class Problem:
    """One attention call in canonical form."""

    q: Tensor  # (B, Hq, L, E)
    k: Tensor  # (B, Hk, S, E)
    v: Tensor  # (B, Hk, S, Ev)
    mask: Optional[Tensor]  # bool / float, (B, Hq, L, S) possibly with stride-0 dims; applies with causal
    spec: AttnSpec
    out_shape: Tuple[int, ...]  # shape of the output the user gets back
    # int64 (B, 2) on q's device: batch b sees keys [begin, end) only (a key-padding mask,
    # normalised); applies with causal and window. None: every key.
    key_bounds: Optional[Tensor] = None
    # varlen_attention: B = 1, and sequence b's query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) see
    # its keys [cu_seqlens_k[b], cu_seqlens_k[b + 1]) only, causal (lower-right) and window aligned
    # within the sequence; int64 (n_seq + 1,) on q's device. None: one sequence.
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    # ALiBi, FlashAttention-2's: fp32 (B, Hq) (varlen: (n_seq, Hq)) slopes; the score of query i and
    # key j gets -slope * |i + S - L - j| (S, L the sequence's) added after the scale. None: no ALiBi.
    alibi_slopes: Optional[Tensor] = None
    # dropout_p > 0: the call's Philox seed, int64 (1,) on the CPU (fused_attn.dropout). None: no dropout.
    dropout_seed: Optional[Tensor] = None
    # attention_with_kvcache: int64 (B,) on q's device, 0 <= seqlens_k[b] <= S: batch b has seqlens_k[b]
    # keys, [0, seqlens_k[b]); the keys after them are never read (an unwritten cache's slots). Causal
    # (lower-right), the window and ALiBi align to each batch's own count (S - L becomes seqlens_k[b] - L),
    # as FlashAttention-2's seqused_k / cache_seqlens. None: every batch has S keys.
    seqlens_k: Optional[Tensor] = None
    # Built by common_call: 4-D inputs of one batch size, no mask or other tensor, the default scale,
    # causal upper-left or none (what dispatch.run_common takes).
    common: bool = False

    def tensor_args(self) -> Dict[str, Tensor]:
        """The call's tensors the kernel ops take (``spec.TENSOR_ARGS``), those given, by name."""
        if self.mask is None and self.key_bounds is None and self.cu_seqlens_q is None and \
                self.alibi_slopes is None and self.dropout_seed is None and self.seqlens_k is None:
            return {}  # the common call: per-call cost
        return {name: t for name in TENSOR_ARGS if (t := getattr(self, name)) is not None}

    def features(self) -> FrozenSet[str]:
        """The optional features (``spec.FEATURES``) this call uses."""
        used = self.spec.features()
        if self.mask is not None:
            used = used | {"bool_mask" if self.mask.dtype == torch.bool else "float_mask"}
            if self.mask.requires_grad and torch.is_grad_enabled():
                used = used | {"mask_grad"}
        if self.key_bounds is not None:
            used = used | {"key_padding"}
        if self.cu_seqlens_q is not None:
            used = used | {"varlen"}
        if self.alibi_slopes is not None:
            used = used | {"alibi"}
        if self.seqlens_k is not None:
            used = used | {"seqlens_k"}
        return used

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
        """Canonical (B, Hq, L, Ev) / (B, Hq, L) results back to the user's shape, lse in its
        public dtype (a backend may return a more precise one: ``ops._common.saved_lse_dtype``)."""
        public = lse_dtype(self.dtype)
        if lse.dtype != public:
            lse = lse.to(public)
        return self.restore_out(out), lse.reshape(self.out_shape[:-1])

    def restore_out(self, out: Tensor) -> Tensor:
        """The canonical output back to the user's shape."""
        return out if out.dim() == len(self.out_shape) else out.reshape(self.out_shape)


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


def _heads_of(name: str, t: Tensor, Hq: int, enable_gqa: bool) -> int:
    """How many heads of ``t`` (key or value, padded to rank >= 3) the query's heads share."""
    H = t.shape[-3]
    if enable_gqa and H != Hq and (H == 0 or Hq % H != 0):
        raise ValueError(f"grouped-query attention needs query heads divisible by {name} heads, got {Hq} and {H}")
    return H


def _canonical(t: Tensor, batch: Tuple[int, ...], B: int, heads: int) -> Tensor:
    """``t`` (..., h, n, d) broadcast to ``batch`` and ``heads`` (h is 1 or heads), folded to (B, heads, n, d)."""
    if t.dim() == 4 and t.shape[0] == B and t.shape[1] == heads and len(batch) == 1:
        return t  # already (B, H, n, d)
    n, d = t.shape[-2], t.shape[-1]
    return t.expand(batch + (heads, n, d)).reshape(B, heads, n, d)


def _window(window) -> Tuple[int, int]:
    """``window`` checked: (left, right), each an int >= -1 (-1: unbounded on that side)."""
    try:
        left, right = window
        ok = all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in (left, right))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"window must be a pair (left, right) of ints >= -1 (-1: unbounded), got {window!r}")
    return left, right


def _key_padding_bounds(attn_mask: Tensor, full: Tuple[int, ...], batch: Tuple[int, ...], B: int) -> Optional[Tensor]:
    """Per-batch key bounds (B, 2) [begin, end) of a mask (broadcastable to ``full``, the
    output's batch dims + (L, S)) that only pads keys: one that broadcasts over heads and queries
    (shape (..., 1, 1, S)) and admits, for each batch entry, one run of consecutive keys (right or
    left padding) and nothing else: True inside the run for a boolean mask, 0 inside and -inf
    outside for a float one. None for any other mask (it stays a mask), and under torch.compile
    (the test reads the mask's values)."""
    S = full[-1]
    if attn_mask.requires_grad or torch.compiler.is_compiling() or B == 0 or S == 0:
        return None
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[-2] != 1 or (m.dim() >= 3 and m.shape[-3] != 1):
        return None
    rows = m[..., 0, 0, :] if m.dim() >= 3 else m[0]  # batch' + (S,), batch' broadcasting to batch
    if rows.dtype == torch.bool:
        keep = rows
    else:
        keep = rows == 0
        if not bool((keep | (rows == float("-inf"))).all()):
            return None
    keep = keep.expand(batch + (S,)).reshape(B, S)
    n = keep.sum(1)
    j = torch.arange(S, device=keep.device)
    begin = torch.where(keep, j, S).amin(1)
    end = torch.where(keep, j + 1, 0).amax(1)
    if not bool((n == (end - begin).clamp_min(0)).all()):
        return None  # holes inside a run: a general mask
    empty = n == 0
    return torch.stack((begin.masked_fill(empty, 0), end.masked_fill(empty, 0)), 1).to(torch.int64).contiguous()


def common_call(q, k, v, is_causal, scale, enable_gqa) -> Optional[Problem]:
    """The Problem of the common call (4-D q, k, v of one batch size, dtype and device, kv heads that
    the query heads share, no mask, no dropout, the default scale) with fewer checks; None for any
    other call, which the general path then checks and canonicalises. Per-call overhead matters
    for small problems (decoding)."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor) or scale is not None:
        return None  # (a tensor subclass takes the general path)
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    B, Hq, L, E = qs
    Hk, S = ks[1], ks[2]
    if not (ks[0] == vs[0] == B and vs[1] == Hk and ks[3] == E > 0 and vs[2] == S):
        return None
    if Hq != Hk and not (Hk == 1 or (enable_gqa and Hk > 0 and Hq % Hk == 0)):
        return None
    dtype = q.dtype
    if k.dtype is not dtype or v.dtype is not dtype or dtype not in SUPPORTED_DTYPES:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu) and not q.device == k.device == v.device:
        return None
    compiling = torch.compiler.is_compiling()
    key = (E, bool(is_causal))
    spec = None if compiling else _COMMON_SPECS.get(key)  # (a traced dict that fills recompiles)
    if spec is None:
        spec = AttnSpec(scale=1.0 / math.sqrt(E), causal=CausalMode.UPPER_LEFT if is_causal else CausalMode.NONE)
        if not compiling and len(_COMMON_SPECS) < 1024:
            _COMMON_SPECS[key] = spec
    return Problem(q, k, v, None, spec, (B, Hq, L, vs[3]), common=True)


_COMMON_SPECS: Dict[Tuple[int, bool], AttnSpec] = {}  # the common call's spec by (head dim, is_causal): frozen, shared


def _alibi(slopes, rows: Tuple[int, ...], n_rows: int, H: int, device) -> Tensor:
    """ALiBi slopes checked (fp32, on ``device``, broadcastable to ``rows + (H,)``: per head, or per
    batch entry / sequence and head) and made (n_rows, H) contiguous."""
    if not isinstance(slopes, Tensor) or slopes.dtype != torch.float32:
        raise TypeError("alibi_slopes must be a float32 tensor of shape (H,) or (batch..., H), got "
                        + (f"{slopes.dtype} {_shape(slopes)}" if isinstance(slopes, Tensor) else type(slopes).__name__))
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but the inputs are on {device}")
    full = rows + (H,)
    try:
        ok = slopes.dim() >= 1 and tuple(torch.broadcast_shapes(slopes.shape, full)) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"alibi_slopes of shape {_shape(slopes)} does not broadcast to {full} (batch..., heads)")
    return slopes.expand(full).reshape(n_rows, H).contiguous()


def _softcap(softcap) -> float:
    """``softcap`` checked: a finite number >= 0 (0: off)."""
    value = float(softcap) if isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) else float("nan")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap!r}")
    return value


def make_problem(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False, window=None, alibi_slopes=None, softcap=0.0) -> Problem:
    """Check the arguments of ``scaled_dot_product_attention`` and canonicalise them.

    Accepts what torch's SDPA accepts: q, k, v of any ranks >= 2 whose leading dims (the
    head dim -3 included) broadcast as in ``torch.matmul``; with ``enable_gqa``, key and
    value heads that each divide the query heads (possibly different counts); empty dims.
    ``window``: (left, right) sliding window (``AttnSpec``), None or (-1, -1) for none. A mask that
    only pads keys becomes per-batch key bounds (``Problem.key_bounds``, see _key_padding_bounds).
    """
    window = NO_WINDOW if window is None or window is NO_WINDOW else _window(window)
    if attn_mask is None and not dropout_p and window == (-1, -1) and alibi_slopes is None and not softcap:
        p = common_call(query, key, value, is_causal, scale, enable_gqa)
        if p is not None:
            return p
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q, k, v = query, key, value
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise ValueError("query, key and value must be at least 2-D (..., L, E), got "
                         f"query {_shape(q)}, key {_shape(k)}, value {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"query, key and value must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; allowed: "
                        + ", ".join(str(d) for d in SUPPORTED_DTYPES))
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    L, E = q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must have the same head dim E, got query {_shape(q)}, key {_shape(k)}")
    if v.shape[-2] != S:
        raise ValueError(f"key and value must have the same length S, got key {_shape(k)}, value {_shape(v)}")
    rank = max(q.dim(), k.dim(), v.dim())
    if rank >= 3:
        q, k, v = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (q, k, v))  # rank 2: one head
        Hq = q.shape[-3]
        Hk, Hv = _heads_of("key", k, Hq, enable_gqa), _heads_of("value", v, Hq, enable_gqa)
        gqa = enable_gqa and (Hk != Hq or Hv != Hq)
        if not gqa:  # the head dim broadcasts like the batch dims
            H = Hq if Hq != 1 else (Hk if Hk != 1 else Hv)
            for name, h in (("key", Hk), ("value", Hv)):
                if h not in (1, H):
                    hint = "; grouped-query attention needs enable_gqa=True" if h and H % h == 0 else ""
                    raise ValueError(f"query has {Hq} heads but {name} has {h} (dim -3) and they do not broadcast{hint}: "
                                     f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}")
        else:
            H = Hq
        try:
            batch = tuple(q.shape[:-3])
            if not (k.shape[:-3] == v.shape[:-3] == batch):  # the common case skips broadcasting
                batch = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]))
        except RuntimeError:
            raise ValueError(
                "the batch dims of query, key and value (all but the last three) must broadcast, got "
                f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}") from None
        out_batch = batch + (H,)
    else:
        Hq = Hk = Hv = H = 1
        batch, out_batch = (), ()
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is None:
        # symbolic under torch.compile(dynamic=True): no float() of it. E = 0: every score is 0.
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    causal = CausalMode.UPPER_LEFT if is_causal else CausalMode.NONE
    mask = key_bounds = None
    B = math.prod(batch)
    if attn_mask is not None:
        if isinstance(attn_mask, CausalBias):
            if is_causal:
                raise ValueError("attn_mask is a CausalBias and is_causal=True; pass one of them "
                                 "(torch refuses this too)")
            causal = _causal_from_bias(attn_mask, L, S)
        elif isinstance(attn_mask, Tensor):
            if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
                raise TypeError(f"attn_mask must be bool, float32 or the query's dtype {q.dtype}, "
                                f"got {attn_mask.dtype}")
            if attn_mask.device != q.device:
                raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
            full = out_batch + (L, S)
            try:
                ok = tuple(torch.broadcast_shapes(attn_mask.shape, full)) == full
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {full}")
            key_bounds = _key_padding_bounds(attn_mask, full, batch, B)
            if key_bounds is not None and bool(((key_bounds[:, 0] == 0) & (key_bounds[:, 1] == S)).all()):
                key_bounds = None  # pads nothing: no mask at all
            elif key_bounds is None:
                mask = attn_mask.expand(full).reshape(B, H, L, S)  # with is_causal too: both apply, as torch
        else:
            raise TypeError(f"attn_mask must be a Tensor, a CausalBias or None, got {type(attn_mask).__name__}")

    if rank >= 3:
        if not gqa:  # key / value heads are 1 or H; H copies of one head are one shared kv head
            Hk, Hv = (1 if h == 1 else H for h in (Hk, Hv))
        if Hk != Hv:  # the kernels take one kv head count: the least common multiple (copies)
            Hkv = math.lcm(Hk, Hv)
            k = k.repeat_interleave(Hkv // Hk, dim=-3) if Hk > 1 else k.expand(k.shape[:-3] + (Hkv,) + k.shape[-2:])
            v = v.repeat_interleave(Hkv // Hv, dim=-3) if Hv > 1 else v.expand(v.shape[:-3] + (Hkv,) + v.shape[-2:])
            Hk = Hv = Hkv
        q, k, v = _canonical(q, batch, B, H), _canonical(k, batch, B, Hk), _canonical(v, batch, B, Hk)
    else:
        q, k, v = (t.reshape(1, 1, t.shape[0], t.shape[1]) for t in (q, k, v))

    if window == (-1, 0):  # lower-right causal as a window: the causal mode, which every kernel runs
        if causal is CausalMode.NONE or L > S:  # (upper-left is the stricter of the two where L <= S)
            causal = CausalMode.LOWER_RIGHT
        window = (-1, -1)
    out_shape = out_batch + (L, v.shape[-1])
    spec = AttnSpec(scale=scale, causal=causal, dropout_p=float(dropout_p), window_left=window[0],
                    window_right=window[1], softcap=_softcap(softcap))
    alibi = None if alibi_slopes is None else _alibi(alibi_slopes, batch, B, H, q.device)
    return Problem(q, k, v, mask, spec, out_shape, key_bounds, alibi_slopes=alibi,
                   dropout_seed=dropout.draw_seed() if spec.dropout_p > 0.0 else None)


def _cu_seqlens(name: str, cu, total: int, max_seqlen, max_name: str, device) -> Tuple[Tensor, int]:
    """``cu`` checked (1-D integer offsets on ``device`` from 0 to ``total``, non-decreasing, no
    sequence longer than ``max_seqlen``) as int64; and its sequence count."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 1:
        raise TypeError(f"{name} must be a 1-D int32 or int64 tensor of n_seq + 1 offsets, got "
                        + (f"{cu.dtype} {_shape(cu)}" if isinstance(cu, Tensor) else type(cu).__name__))
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    offsets = cu.tolist()
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or offsets[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(f"{name} must run from 0 to {total} (the packed length) without decreasing, got {offsets}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is less than the longest sequence, {max(lengths)}")
    return cu.to(torch.int64).contiguous(), len(lengths)


def _check_operands(named: Tuple[Tuple[str, object], ...], rank: int, dims: str) -> None:
    """The (name, tensor) pairs ``named`` (q, k, v of varlen_attention or attention_with_kvcache) checked:
    each a ``rank``-D tensor (``dims`` names its dims), one dtype of SUPPORTED_DTYPES, one device."""
    for name, t in named:
        if not isinstance(t, Tensor) or t.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor ({dims}), got "
                             + (_shape(t) if isinstance(t, Tensor) else type(t).__name__))
    names = ", ".join(name for name, _ in named[:-1]) + " and " + named[-1][0]
    tensors = [t for _, t in named]
    if len({t.dtype for t in tensors}) != 1 or tensors[0].dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{names} must have one dtype of {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got "
                        + ", ".join(str(t.dtype) for t in tensors))
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{names} must be on one device, got " + ", ".join(str(t.device) for t in tensors))


def _bottom_right_spec(E: int, scale, causal: bool, window, softcap, dropout_p=0.0) -> AttnSpec:
    """The spec of a call whose causal diagonal and window align bottom-right per sequence (varlen_attention,
    attention_with_kvcache), its arguments checked: ``scale`` None (1/sqrt(E)) or finite, ``window`` as
    :func:`_window` ((-1, 0) is lower-right causal), ``softcap`` as :func:`_softcap`, ``dropout_p`` in [0, 1].
    The default options' specs are kept per (E, causal): decoding steps ask for the same one each step."""
    plain = scale is None and (window is None or window is NO_WINDOW) and softcap == 0.0 and dropout_p == 0.0 \
        and not torch.compiler.is_compiling()
    if plain and (spec := _BOTTOM_RIGHT_SPECS.get((E, bool(causal)))) is not None:
        return spec
    spec = _checked_bottom_right_spec(E, scale, causal, window, softcap, dropout_p)
    if plain and len(_BOTTOM_RIGHT_SPECS) < 1024:
        _BOTTOM_RIGHT_SPECS[E, bool(causal)] = spec
    return spec


_BOTTOM_RIGHT_SPECS: Dict[Tuple[int, bool], AttnSpec] = {}


def _checked_bottom_right_spec(E: int, scale, causal: bool, window, softcap, dropout_p) -> AttnSpec:
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    window = (-1, -1) if window is None else _window(window)
    mode = CausalMode.LOWER_RIGHT if causal or window == (-1, 0) else CausalMode.NONE
    if window == (-1, 0):
        window = (-1, -1)
    return AttnSpec(scale=float(scale), causal=mode, dropout_p=float(dropout_p), window_left=window[0],
                    window_right=window[1], softcap=_softcap(softcap))


def make_kvcache_problem(q, k_cache, v_cache, paged: bool, causal=True, scale=None, window=None,
                         alibi_slopes=None, softcap=0.0) -> Problem:
    """The attention part of ``attention_with_kvcache``, its arguments checked: q (B, Hq, L, E) against a
    cache k (B, Hk, S, E), v (B, Hk, S, Ev) (``paged``: (num_blocks, Hk, block_size, E / Ev), any dim 0), any
    strides. Causal and window align bottom-right to each batch's key count. The caller then sets the
    Problem's k, v (a paged cache's blocks in order) and ``seqlens_k`` (the counts) once ``fused_attn.kvcache``
    has checked the cache's own arguments and appended the new keys: nothing is written before every
    argument is checked."""
    _check_operands((("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, "batch, heads, length, head dim")
    (B, Hq, L, E), (Bk, Hk, S, Ek), (Bv, Hv, Sv, Ev) = q.shape, k_cache.shape, v_cache.shape
    if not ((paged or Bk == B) and Bv == Bk and Ek == E and Hv == Hk and Sv == S):
        want = "(num_blocks, Hk, block_size, E)" if paged else "(B, Hk, S_max, E)"
        raise ValueError(f"k_cache must be {want} and v_cache the same with Ev, with q's "
                         f"{'E' if paged else 'B and E'}, got q {_shape(q)}, k_cache {_shape(k_cache)}, v_cache "
                         f"{_shape(v_cache)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the query heads must be a multiple of the key/value heads, got {Hq} and {Hk}")
    spec = _bottom_right_spec(E, scale, causal, window, softcap)
    alibi = None if alibi_slopes is None else _alibi(alibi_slopes, (B,), B, Hq, q.device)
    return Problem(q, k_cache, v_cache, None, spec, (B, Hq, L, Ev), alibi_slopes=alibi)


def make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        scale=None, causal=False, window=None, alibi_slopes=None, softcap=0.0) -> Problem:
    """Check the arguments of ``varlen_attention`` and pack them as one problem of batch 1: q
    (1, Hq, total_q, E), k and v (1, Hk, total_k, E / Ev) views of the packed (total, H, E) inputs,
    with the sequences' offsets (``Problem.cu_seqlens_q`` / ``_k``); causal is lower-right per sequence."""
    _check_operands((("q", q), ("k", k), ("v", v)), 3, "total, heads, head dim")
    (Lt, Hq, E), (St, Hk, Ek), (Sv, Hv, Ev) = q.shape, k.shape, v.shape
    if Ek != E or Sv != St or Hv != Hk:
        raise ValueError(f"k must be (total_k, Hk, E) and v (total_k, Hk, Ev) with q's E, got q {_shape(q)}, "
                         f"k {_shape(k)}, v {_shape(v)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the query heads must be a multiple of the key/value heads, got {Hq} and {Hk}")
    cu_q, n_seq = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, Lt, max_seqlen_q, "max_seqlen_q", q.device)
    cu_k, n_seq_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, St, max_seqlen_k, "max_seqlen_k", q.device)
    if n_seq != n_seq_k:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got {n_seq} and {n_seq_k}")
    spec = _bottom_right_spec(E, scale, causal, window, softcap, dropout_p)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    alibi = None if alibi_slopes is None else _alibi(alibi_slopes, (n_seq,), n_seq, Hq, q.device)
    return Problem(q4, k4, v4, None, spec, (1, Hq, Lt, Ev), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                   alibi_slopes=alibi, dropout_seed=dropout.draw_seed() if spec.dropout_p > 0.0 else None)
