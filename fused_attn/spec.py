"""What an attention call computes, described once from the API to every kernel.

:class:`AttnSpec` (frozen) holds the call's scalar semantics: which keys each query sees
(``causal``, a sliding ``window``), the softmax ``scale``, logit ``softcap`` and ``dropout_p``. ``make_problem`` builds it once;
the dispatcher, the autograd formula, the reference and the backends read it; the kernel ops
take it flattened by :meth:`AttnSpec.op_args` (schema :data:`OP_ARGS_SCHEMA`, rebuilt by
:meth:`AttnSpec.from_op_args`): the one place a field is turned into op arguments. In C++ the
same fields are ``csrc/common/attn_params.h`` (``Visibility``, ``scale``).

Tensors that describe the call travel in the :class:`~fused_attn.problem.Problem` beside the
spec; the ops take them as their last arguments (:data:`TENSOR_ARGS`, None where unused):
``key_bounds`` (a key-padding mask normalised by ``make_problem``), ``mask``,
``cu_seqlens_q`` / ``cu_seqlens_k`` (variable-length sequences packed into one problem) and
``alibi_slopes``, ``dropout_seed`` (``fused_attn.dropout``: how every backend drops the same
elements), ``seqlens_k`` (per-batch key counts: ``attention_with_kvcache``'s cache lengths). :meth:`Problem.features` names what a call uses beyond plain attention;
each backend declares in :class:`Capabilities` which of those it runs, and the dispatcher
derives its refusal messages from that data.

A new feature (soft-capping, ALiBi, dropout in the kernels) adds: a field
here (with its validation in ``make_problem``), its entry in :data:`FEATURES`, its effect in
``reference.attention``, its op argument in ``op_args`` / ``OP_ARGS_SCHEMA``, and its name in
the ``Capabilities`` of each backend that runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor


class CausalMode(IntEnum):
    """Which keys a query may see. Values are what the kernel ops take (``csrc/common/attn_params.h``)."""

    NONE = 0
    UPPER_LEFT = 1   # query i sees keys j <= i (torch's ``is_causal=True``)
    LOWER_RIGHT = 2  # query i sees keys j <= i + (S - L) (FlashAttention's, KV-cache decoding)

    def offset(self, L: int, S: int) -> int:
        """Query i sees key j iff ``j <= i + offset`` (meaningless for NONE)."""
        return S - L if self is CausalMode.LOWER_RIGHT else 0


def causal_mask(L: int, S: int, mode: CausalMode, device=None) -> Optional[Tensor]:
    """Boolean ``(L, S)`` mask, True where a query may attend; None when not causal."""
    if mode is CausalMode.NONE:
        return None
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + mode.offset(L, S)


def visible_keys(L: int, S: int, spec: "AttnSpec", key_bounds: Optional[Tensor] = None,
                 device=None) -> Optional[Tensor]:
    """Boolean mask, True where a query may attend under ``spec`` (causal, window) and the
    per-batch ``key_bounds`` ((B, 2): batch b sees keys [begin, end) only): ``(L, S)``, or
    ``(B, 1, L, S)`` with key bounds; None when every query sees every key."""
    allowed = causal_mask(L, S, spec.causal, device)
    if spec.window_left >= 0 or spec.window_right >= 0:
        i = torch.arange(L, device=device)[:, None] + (S - L)  # FlashAttention's alignment: bottom-right
        j = torch.arange(S, device=device)[None, :]
        win = torch.ones(L, S, dtype=torch.bool, device=device)
        if spec.window_left >= 0:
            win = win & (j >= i - spec.window_left)
        if spec.window_right >= 0:
            win = win & (j <= i + spec.window_right)
        allowed = win if allowed is None else allowed & win
    if key_bounds is not None:
        j = torch.arange(S, device=device)
        kb = key_bounds.to(device)
        keys = (j >= kb[:, :1]) & (j < kb[:, 1:])  # (B, S)
        keys = keys[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


# Features a call may use beyond plain attention, and how a refusal names them.
FEATURES = {
    "causal": "a causal mask",
    "bool_mask": "a boolean attn_mask tensor",
    "float_mask": "a float attn_mask tensor",
    "mask_grad": "a float attn_mask that requires grad",
    "dropout": "dropout_p > 0",
    "window": "a sliding window",
    "key_padding": "a key-padding mask",
    "varlen": "varlen_attention (packed variable-length sequences)",
    "alibi": "ALiBi (alibi_slopes)",
    "softcap": "logit soft-capping (softcap > 0)",
    "seqlens_k": "per-sequence key counts (attention_with_kvcache's cache_seqlens)",
}

# The call's tensors the kernel ops take after the spec's fields (Problem's fields of these names;
# None where unused): per-batch key bounds, the mask tensor, the varlen sequences' offsets, the ALiBi
# slopes, the dropout seed (``fused_attn.dropout``: an int64 CPU tensor of shape (1,)), the per-batch key counts
# (Problem.seqlens_k).
TENSOR_ARGS = ("key_bounds", "mask", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "dropout_seed", "seqlens_k")
# The spec's fields as the kernel ops take them (torch.library schema), in op_args' order, then the
# tensors of TENSOR_ARGS.
OP_ARGS_SCHEMA = ("int causal, float scale, int window_left=-1, int window_right=-1, float softcap=0.0, "
                  "float dropout_p=0.0, "
                  + ", ".join(f"Tensor? {name}=None" for name in TENSOR_ARGS))
_NO_TENSORS = (None,) * len(TENSOR_ARGS)
_NO_FEATURES: FrozenSet[str] = frozenset()


def op_arg_index(name: str) -> int:
    """Where tensor ``name`` (of :data:`TENSOR_ARGS`) stands among the op arguments of :data:`OP_ARGS_SCHEMA`."""
    return len(OP_ARGS_SCHEMA.split(",")) - len(TENSOR_ARGS) + TENSOR_ARGS.index(name)


@dataclass(frozen=True)
class AttnSpec:
    """The scalar semantics of one attention call (see the module docstring)."""

    scale: float
    causal: CausalMode = CausalMode.NONE
    dropout_p: float = 0.0
    # Sliding window, FlashAttention-2's: query i sees keys j with
    # i + S - L - window_left <= j <= i + S - L + window_right; -1: unbounded on that side.
    window_left: int = -1
    window_right: int = -1
    # Logit soft-capping, FlashAttention-2's: a score x = scale q.k becomes softcap * tanh(x / softcap)
    # (before ALiBi and masks); 0: off.
    softcap: float = 0.0

    def op_args(self, **tensors: Optional[Tensor]) -> tuple:
        """The fields the kernel ops take, in :data:`OP_ARGS_SCHEMA`'s order, then the call's tensors
        (``tensors`` by their :data:`TENSOR_ARGS` names; the others None)."""
        scalars = (int(self.causal), self.scale, self.window_left, self.window_right, self.softcap, self.dropout_p)
        if not tensors:  # the common call: per-call cost
            return scalars + _NO_TENSORS
        return scalars + tuple(tensors.get(name) for name in TENSOR_ARGS)

    @classmethod
    def from_op_args(cls, causal: int, scale: float, window_left: int = -1, window_right: int = -1,
                     softcap: float = 0.0, dropout_p: float = 0.0,
                     *tensors: Optional[Tensor]) -> Tuple["AttnSpec", Dict[str, Tensor]]:
        """The spec and the call's tensors (by name, those given) back from :meth:`op_args` (inside an
        op: the kernels' view of the call)."""
        spec = cls(scale=scale, causal=CausalMode(causal), window_left=window_left, window_right=window_right,
                   softcap=softcap, dropout_p=dropout_p)
        return spec, {name: t for name, t in zip(TENSOR_ARGS, tensors) if t is not None}

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    def features(self) -> FrozenSet[str]:
        """The :data:`FEATURES` this spec uses."""
        if not (self.causal or self.dropout_p > 0.0 or self.windowed or self.softcap > 0.0):
            return _NO_FEATURES  # plain attention: per-call cost
        used = set()
        if self.causal is not CausalMode.NONE:
            used.add("causal")
        if self.dropout_p > 0.0:
            used.add("dropout")
        if self.windowed:
            used.add("window")
        if self.softcap > 0.0:
            used.add("softcap")
        return frozenset(used)


@dataclass(frozen=True)
class Capabilities:
    """What a kernel backend runs, as data: the dispatcher derives refusals from it (see
    ``dispatch.KernelBackend.refusal``); the backend keeps code only for hardware checks."""

    devices: Tuple[str, ...]          # tensor device types
    dtypes: Tuple[torch.dtype, ...]
    features: FrozenSet[str]          # names from FEATURES
    max_head_dim: int = 256           # E and Ev, each in [1, max_head_dim]
    device_note: str = ""             # said after a device refusal

    def refusal(self, name: str, features: FrozenSet[str], dtype: torch.dtype, device: torch.device,
                head_dim: int, head_dim_v: int) -> Optional[str]:
        """Why backend ``name`` with these capabilities cannot run such a call (None: it can)."""
        missing = sorted(features - self.features)
        if missing:
            allowed = [FEATURES[f] for f in sorted(self.features)]
            also = f" (it runs: {', '.join(allowed)})" if allowed else ""
            return "; ".join(f"{FEATURES[f]} is not supported" for f in missing) + also
        if device.type not in self.devices:
            return (f"tensors on {device.type} are not supported (the {name} backend runs "
                    f"{' or '.join(self.devices)} tensors{self.device_note})")
        if dtype not in self.dtypes:
            return f"dtype {dtype} is not supported ({', '.join(str(d).replace('torch.', '') for d in self.dtypes)})"
        if head_dim == 0 or head_dim_v == 0:
            return f"head dims of 0 are not supported, got E = {head_dim}, Ev = {head_dim_v}"
        if max(head_dim, head_dim_v) > self.max_head_dim:
            return f"head dims up to {self.max_head_dim} are supported, got E = {head_dim}, Ev = {head_dim_v}"
        return None
