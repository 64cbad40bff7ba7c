"""Seeded random attention problems for tests/test_fuzz.py, and the check of one of them.

A :class:`Case` is plain data (shapes, per-tensor strides over a small storage, dtype,
scale, value magnitude, NaN/inf placement, causal mode, backward, lse gradient,
backend); :func:`generate` draws a fixed list of them from a seed, so every case has
a stable id and :meth:`Case.reproducer` prints Python that rebuilds its exact tensors.

:func:`check_case` runs the case on its backend through the public API and compares
out, lse and (with backward) dq, dk, dv with the fp64 reference
(``fused_attn.reference``): NaN and +-inf placement exactly, finite values under the
one tolerance rule (``fused_attn.testing``) with plain PyTorch in the case's dtype as
the baseline. Where that baseline overflows (16-bit scores at scales like 1e30) and
the reference does not, the baseline is plain PyTorch computed in fp32 from the same
inputs and rounded to the dtype: the best plain PyTorch does for such a call. The
fp64 reference itself is checked against torch's math SDPA in fp64 on the rows that
see at least one key (torch's math path gives NaN for the others).
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close, stores_bf16_by_truncation

from attn_cases import run_attention, sdpa_causal_args

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}
# What each backend runs on this machine, and how big its cases may be (the Triton interpreter
# and the CUDA emulator are slow: tiny shapes only).
BACKENDS = {
    "cpu": dict(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), max_len=70, max_dim=136),
    "reference": dict(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), max_len=40, max_dim=72),
    "triton": dict(dtypes=(torch.float16, torch.bfloat16, torch.float32), max_len=20, max_dim=40),
    # offsets in whole 16-byte units: a contiguous view at an odd offset is refused today (see
    # tests/test_fuzz.py::test_cuda_contiguous_view_at_unaligned_offset)
    "cuda": dict(dtypes=(torch.float16, torch.bfloat16), max_len=20, max_dim=40, align=8),
}
LENGTHS = (1, 2, 3, 5, 7, 8, 16, 17, 31, 33, 64, 65, 70)
HEAD_DIMS = (1, 2, 3, 5, 8, 15, 16, 24, 33, 40, 64, 72, 111, 128, 136)
LAYOUTS = ("contiguous", "blhe", "transposed", "padded", "expanded", "overlapping", "huge_stride")
SPECIALS = ("nan_q", "nan_k", "nan_v", "inf_q", "ninf_k", "inf_v")
HUGE = 2 ** 31 + 5  # an element stride that does not fit in int32, on a dim of size 1


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as ``storage.as_strided(shape, stride, offset)`` over a fresh random storage."""

    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int

    @property
    def storage_size(self) -> int:
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1


@dataclass(frozen=True)
class Case:
    seed: int
    backend: str
    dtype: torch.dtype
    q: TensorSpec
    k: TensorSpec
    v: TensorSpec
    layouts: Tuple[str, str, str]
    scale: Optional[float]
    magnitude: float  # std of q and k (v is N(0, 1)): scores grow with it
    special: Optional[Tuple[str, int]]  # (what, storage index) of one NaN / inf input value
    mode: CausalMode
    backward: bool
    lse_grad: bool

    @property
    def id(self) -> str:
        B, Hq, L, E = self.q.shape
        Hk, S, Ev = self.k.shape[1], self.k.shape[2], self.v.shape[3]
        parts = [f"s{self.seed}", self.backend, DTYPE_NAMES[self.dtype], f"{B}x{Hq}/{Hk}x{L}x{S}x{E}/{Ev}",
                 self.mode.name.lower(), "+".join(self.layouts)]
        parts += [] if self.scale is None else [f"scale{self.scale:.3g}"]
        parts += [] if self.magnitude == 1.0 else [f"mag{self.magnitude:g}"]
        parts += [] if self.special is None else [self.special[0]]
        parts += ["bwd" + ("+dlse" if self.lse_grad else "")] if self.backward else []
        return "-".join(parts)

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for name, spec, mag in (("q", self.q, self.magnitude), ("k", self.k, self.magnitude), ("v", self.v, 1.0)):
            storage = (torch.randn(spec.storage_size, generator=g) * mag).to(self.dtype)
            if self.special is not None and self.special[0].endswith("_" + name):
                storage[self.special[1]] = _special_value(self.special[0])
            out.append(storage.as_strided(spec.shape, spec.stride, spec.offset))
        return tuple(out)

    def call_kwargs(self) -> dict:
        L, S = self.q.shape[2], self.k.shape[2]
        kw = dict(scale=self.scale, enable_gqa=self.q.shape[1] != self.k.shape[1])
        kw.update(sdpa_causal_args(self.mode, L, S))
        return kw

    def reproducer(self) -> str:
        """Standalone Python that rebuilds this case's tensors and calls the backend."""
        L, S = self.q.shape[2], self.k.shape[2]
        env = {"triton": "import os; os.environ['TRITON_INTERPRET'] = '1'  # on a CPU, before fused_attn is imported",
               "cuda": "import os; os.environ['FUSED_ATTN_CUDA_EMULATE'] = '1'  # on a CPU"}
        lines = [env[self.backend]] if self.backend in env else []
        lines += ["import torch, fused_attn", "from torch.nn.attention.bias import causal_lower_right",
                  f"g = torch.Generator().manual_seed({self.seed})"]
        for name, spec, mag in (("q", self.q, self.magnitude), ("k", self.k, self.magnitude), ("v", self.v, 1.0)):
            lines.append(f"{name}s = (torch.randn({spec.storage_size}, generator=g) * {mag!r})"
                         f".to(torch.{DTYPE_NAMES[self.dtype]})")
        if self.special is not None:
            what, index = self.special
            lines.append(f"{what[-1]}s[{index}] = float({str(_special_value(what))!r})")
        for name, spec in (("q", self.q), ("k", self.k), ("v", self.v)):
            lines.append(f"{name} = {name}s.as_strided({spec.shape}, {spec.stride}, {spec.offset})"
                         + (".requires_grad_()" if self.backward else ""))
        mask = {CausalMode.NONE: "", CausalMode.UPPER_LEFT: ", is_causal=True",
                CausalMode.LOWER_RIGHT: f", attn_mask=causal_lower_right({L}, {S})"}[self.mode]
        lines.append(f"out, lse = fused_attn.attention_with_lse(q, k, v, scale={self.scale!r}, "
                     f"enable_gqa={self.q.shape[1] != self.k.shape[1]}{mask}, backend={self.backend!r})")
        lines.append(f"# rerun the check: python -c \"import sys; sys.path.insert(0, 'tests'); import fuzz_cases as f; "
                     f"f.check_case(f.case_by_id({self.id!r}))\"")
        return "\n".join(lines)


def _special_value(what: str) -> float:
    return {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}[what.split("_")[0]]


def _layout(rng: random.Random, kind: str, B: int, H: int, n: int, d: int, align: int) -> TensorSpec:
    """Strides of a (B, H, n, d) tensor laid out as ``kind``; a random offset, a multiple of ``align``."""
    offset = align * rng.randrange(0, 7)
    if kind == "contiguous":
        stride = (H * n * d, n * d, d, 1)
    elif kind == "blhe":  # (B, n, H, d) memory, the layout after a linear projection
        stride = (n * H * d, d, H * d, 1)
    elif kind == "transposed":  # head dim not unit-stride
        stride = (H * d * n, d * n, 1, n)
    elif kind == "padded":  # rows wider than the head dim (a column slice of a wider tensor)
        row = d + rng.randrange(1, 9)
        stride = (H * n * row, n * row, row, 1)
    elif kind == "expanded":  # batch (and heads, when asked) broadcast with stride 0
        stride = (0, rng.choice((0, n * d)), d, 1)
    elif kind == "overlapping":  # rows share elements
        row = max(1, d // 2)
        stride = (H * n * row + d, n * row + d, row, 1)
    elif kind == "huge_stride":  # strides past 2**31 elements on dims of size 1, over a small storage
        stride = [H * n * d, n * d, d, 1]
        for i, size in enumerate((B, H, n)):
            if size == 1:
                stride[i] = HUGE
        stride = tuple(stride)
    else:
        raise ValueError(kind)
    return TensorSpec((B, H, n, d), stride, offset)


def _draw(rng: random.Random, seed: int, backend: str, index: int) -> Case:
    caps = BACKENDS[backend]
    dtype = rng.choice(caps["dtypes"])
    lengths = [n for n in LENGTHS if n <= caps["max_len"]]
    dims = [d for d in HEAD_DIMS if d <= caps["max_dim"]]
    B = rng.choice((1, 1, 2))
    Hk = rng.choice((1, 1, 2, 3))
    Hq = Hk * rng.choice((1, 1, 2, 3))
    L, S = rng.choice(lengths), rng.choice(lengths)
    E = rng.choice(dims)
    Ev = E if rng.random() < 0.6 else rng.choice(dims)
    layouts = tuple(rng.choice(LAYOUTS) if rng.random() < 0.5 else "contiguous" for _ in range(3))
    align = caps.get("align", 1)
    q = _layout(rng, layouts[0], B, Hq, L, E, align)
    k = _layout(rng, layouts[1], B, Hk, S, E, align)
    v = _layout(rng, layouts[2], B, Hk, S, Ev, align)
    r = rng.random()
    if r < 0.5:
        scale = None
    elif r < 0.8:
        scale = rng.choice((-1.0, 1.0)) * 10 ** rng.uniform(-2, 1)
    else:  # extreme scales, either sign
        scale = rng.choice((-1.0, 1.0)) * 10 ** rng.choice((-30, -12, -3, 3, 9, 30))
    magnitude = rng.choice((1.0, 1.0, 1.0, 0.1, 4.0))
    special = None
    if index % 6 == 5:  # every sixth case holds one NaN or inf, the kinds in turn
        what = SPECIALS[(index // 6) % len(SPECIALS)]
        spec = {"q": q, "k": k, "v": v}[what[-1]]
        special = (what, rng.randrange(spec.offset, spec.storage_size))
    mode = rng.choice(tuple(CausalMode))
    backward = rng.random() < 0.7
    lse_grad = backward and rng.random() < 0.4
    return Case(seed, backend, dtype, q, k, v, layouts, scale, magnitude, special, mode, backward, lse_grad)


def generate(backend: str, count: int, base_seed: int = 20261201) -> List[Case]:
    """``count`` cases for ``backend``; case i is drawn from seed ``base_seed + i`` alone."""
    return [_draw(random.Random(f"{backend}:{base_seed + i}"), base_seed + i, backend, i) for i in range(count)]


def case_by_id(case_id: str, counts: int = 1000) -> Case:
    backend = case_id.split("-")[1]
    for case in generate(backend, counts):
        if case.id == case_id:
            return case
    raise KeyError(case_id)


def _nonfinite_mismatch(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """None if NaN, +inf and -inf sit at the same places in ``got`` and ``want``."""
    for what, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = f(got), f(want)
        if not torch.equal(a, b):
            where = torch.nonzero(a != b)[0].tolist()
            return (f"{name}: {what} placement differs from the fp64 reference at {int((a != b).sum())} elements, "
                    f"first {where}: got {got[tuple(where)].item()}, reference {want[tuple(where)].item()}")
    return None


def _same_class(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: both NaN, both +inf, both -inf or both finite."""
    return ((torch.isnan(a) == torch.isnan(b)) & (torch.isposinf(a) == torch.isposinf(b))
            & (torch.isneginf(a) == torch.isneginf(b)))


def _finite_part(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, t.double(), torch.zeros((), dtype=torch.float64))


def check_case(case: Case) -> Dict[str, float]:
    """Run ``case`` and check it (see the module doc). Returns the error ratios; raises
    AssertionError with the case id and its reproducer on any difference."""
    try:
        return check(case.backend, *case.tensors(), case.mode, case.scale, case.backward, case.lse_grad, case.seed,
                     special=case.special is not None)
    except AssertionError as e:
        raise AssertionError(f"{case.id}\n{e}\n--- reproducer ---\n{case.reproducer()}") from None


def check(backend: str, q, k, v, mode: CausalMode = CausalMode.NONE, scale: Optional[float] = None,
          backward: bool = True, lse_grad: bool = False, seed: int = 0, special: bool = False) -> Dict[str, float]:
    """Check ``backend`` on (B, H, L, E) inputs q, k, v against the fp64 reference (module doc).
    ``special``: the inputs hold NaN or inf (see below for what is then required of gradients)."""
    L, S = q.shape[2], k.shape[2]
    kw = dict(scale=scale, enable_gqa=q.shape[1] != k.shape[1], **sdpa_causal_args(mode, L, S))
    dtype = q.dtype
    sees = _rows_that_see_a_key(mode, L, S)
    qr, kr, vr = q, k, v
    if special:  # the oracle's inputs: a query row that sees no key, or a key no row sees, cannot matter
        seen = _keys_that_are_seen(mode, L, S)
        qr = torch.where(sees[:, None], q, torch.zeros((), dtype=dtype))
        kr, vr = (torch.where(seen[:, None], t, torch.zeros((), dtype=dtype)) for t in (k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run_attention(backend, q, k, v, mode, kw, backward, lse_grad, seed)
        ref = run_attention(None, qr, kr, vr, mode, kw, backward, lse_grad, seed, compute_dtype=torch.float64)
        base = run_attention(None, qr, kr, vr, mode, kw, backward, lse_grad, seed)
        ref32 = run_attention(None, qr, kr, vr, mode, kw, backward, lse_grad, seed, compute_dtype=torch.float32)
        if any(bool((~torch.isfinite(base[n]) & torch.isfinite(ref[n])).any()) for n in base):
            base = {n: t.to(base[n].dtype) for n, t in ref32.items()}
    if not special:
        _check_reference_against_torch(q, k, v, kw, mode, ref)
    else:
        # A row that sees no key outputs 0 with lse -inf (the public contract), even where the
        # oracle's P @ V turns a NaN / inf of v into 0 * NaN. A row that sees keys and whose
        # scores hold a NaN gets lse NaN; the oracle says -inf (its "sees a key" test is
        # denominator > 0, False for NaN).
        for r in (ref, ref32):
            r["out"] = torch.where(sees[:, None], r["out"], 0.0)
            nan_rows = torch.isnan(r["out"]).any(-1) & torch.isneginf(r["lse"]) & sees
            r["lse"] = torch.where(nan_rows, float("nan"), torch.where(sees, r["lse"], float("-inf")))
    truncated = stores_bf16_by_truncation(backend, dtype)
    ratios = {}
    for name in ref:
        # non-finite placement against the reference rounded to the result's dtype (6.9e9 is inf in fp16)
        rounded = ref[name].to(got[name].dtype)
        if special:
            # where fp64 and fp32 disagree (an inf of v times a weight that is 1e-50 in fp64 and 0
            # in fp32 is inf in one, NaN in the other), a kernel computing in fp32 may follow fp32
            rounded = torch.where(_same_class(got[name], ref32[name]) & ~_same_class(got[name], rounded),
                                  got[name].to(rounded.dtype), rounded)
        if not special or name in ("out", "lse"):
            mismatch = _nonfinite_mismatch(name, got[name], rounded)
            assert mismatch is None, mismatch
            keep = torch.isfinite(rounded) & torch.isfinite(ref[name])
        else:
            # Which gradient elements a NaN / inf input reaches depends on the order of the
            # sums (0 * NaN inside a block the kernel computes, keys a causal kernel skips), so
            # only this is required: the gradient is non-finite somewhere iff the reference's
            # is, in fp64 or fp32 (a hidden NaN fails), and elements finite in both meet the rule.
            has = bool((~torch.isfinite(got[name])).any())
            want = {bool((~torch.isfinite(r[name].to(got[name].dtype))).any()) for r in (ref, ref32)}
            assert has in want, (f"{name}: {'some' if has else 'no'} non-finite elements, the fp64 reference has "
                                 f"{int((~torch.isfinite(rounded)).sum())}")
            keep = torch.isfinite(rounded) & torch.isfinite(ref[name]) & torch.isfinite(got[name])
        ratios[name] = assert_close(_finite_part(got[name], keep), _finite_part(ref[name], keep),
                                    _finite_part(base[name], keep & torch.isfinite(base[name])), name, dtype=dtype,
                                    truncated_bf16=truncated and name != "lse")
    return ratios


def _rows_that_see_a_key(mode: CausalMode, L: int, S: int) -> torch.Tensor:
    if mode is CausalMode.NONE:
        return torch.ones(L, dtype=torch.bool)
    return torch.arange(L) + mode.offset(L, S) >= 0


def _keys_that_are_seen(mode: CausalMode, L: int, S: int) -> torch.Tensor:
    if mode is CausalMode.NONE:
        return torch.ones(S, dtype=torch.bool)
    return torch.arange(S) <= L - 1 + mode.offset(L, S)


def _check_reference_against_torch(q, k, v, kw, mode: CausalMode, ref) -> None:
    """The fp64 oracle agrees with torch's math SDPA in fp64 on rows that see a key (forward only)."""
    L, S = q.shape[2], k.shape[2]
    with sdpa_kernel(SDPBackend.MATH):
        want = torch.nn.functional.scaled_dot_product_attention(q.detach().double(), k.detach().double(),
                                                                v.detach().double(), **kw)
    sees = _rows_that_see_a_key(mode, L, S)
    got, want = ref["out"].double()[:, :, sees], want[:, :, sees]
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), \
        "fp64 reference and torch's math SDPA in fp64 differ in non-finite placement"
    ok = torch.isfinite(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-9, atol=1e-9 * max(1.0, math.sqrt(S)),
                               msg=lambda m: "fp64 reference differs from torch's math SDPA in fp64: " + m)
