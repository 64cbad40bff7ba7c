"""The fused CPU backend (fused_attn/ops/cpu.py, csrc/cpu/) against the reference.

The cases come from the one grid (tests/attn_cases.py), and every result is checked under
the project's one tolerance rule (attn_cases.check_backend, fused_attn.testing): the
kernel's error against the fp64 reference at most 2x plain PyTorch's error in the same
dtype. Outputs are NaN-poisoned before the kernels run (FUSED_ATTN_POISON=1), so
an element a kernel forgets to write fails the comparison.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fused_attn
from fused_attn.ops import cpu
from fused_attn.spec import CausalMode
from fused_attn.testing import peak_memory_bytes

from attn_cases import CAUSAL_MODES, check_backend, grid, make_inputs, mode_id, sdpa_causal_args

pytestmark = [pytest.mark.filterwarnings("ignore:Lower right causal bias")]


def test_extension_is_built():
    """The README's install builds fused_attn._C_cpu; without it every test below would test nothing."""
    assert cpu._C is not None, cpu._IMPORT_ERROR


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_POISON", "1")


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def check(q, k, v, mode: CausalMode, with_lse_grad: bool = True, scale=None):
    """out, lse, dq, dk, dv of the cpu backend vs. the fp64 reference (attn_cases.check_backend),
    with an lse gradient unless told otherwise (else the kernel's backward gets dlse = None)."""
    check_backend("cpu", q, k, v, mode, with_lse_grad=with_lse_grad, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", grid("seqlens", "cpu"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_seqlens_causal_dtypes(mode, L, S, dtype):
    check(*make_inputs(2, 2, 2, L, S, 40, 40, dtype), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E,Ev", grid("head_dims", "cpu"))
def test_head_dims(E, Ev, dtype):
    check(*make_inputs(1, 2, 2, 97, 203, E, Ev, dtype), CausalMode.LOWER_RIGHT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(72, 40), (33, 17)])
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_many_key_blocks(mode, E, Ev, dtype):
    """S = 1100 spans several key blocks of every path (forward 512, backward 128),
    so the online-softmax rescale, the packed panels of later blocks and
    a ragged last block all run; odd E takes the 16-bit packing's non-word-aligned path."""
    check(*make_inputs(1, 2, 1, 130, 1100, E, Ev, dtype), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hq,Hk,L", [(8, 2, 1), (10, 2, 3), (8, 2, 4)], ids=["decode_4rows", "15rows", "16rows"])
def test_few_rows_per_kv_head(Hq, Hk, L, dtype):
    """The forward packs a kv head only where FWD_PACK_MIN_ROWS (16) query rows read it or the keys are fewer
    than FWD_IN_PLACE_MIN_KEYS (512) (csrc/cpu/config.h): a decoding step (L = 1, 4 query heads per kv head) and
    15 rows read K and V in place at S = 1100, 16 rows pack them, and every case packs at S = 300; each against
    the reference, lower-right causal."""
    check(*make_inputs(2, Hq, Hk, L, 1100, 64, 64, dtype), CausalMode.LOWER_RIGHT)
    check(*make_inputs(2, Hq, Hk, L, 300, 64, 64, dtype), CausalMode.LOWER_RIGHT)  # packed below 512 keys


@pytest.mark.parametrize("L,Hk", [(1, 2), (3, 2), (2, 1)], ids=["decode", "3rows", "gqa_stacked"])
def test_few_rows_at_large_scores_fp32(L, Hk):
    """fp32 with fewer than FWD_PACK_MIN_ROWS rows per kv head and 512 keys or more: the forward's scores come from BLAS, the
    backward's from the micro-kernel (AVX-512), so the backward forms every row's max and sum again from its
    own scores. At scores ~1e3 the forward's lse missed them by their rounding: a fuzz case (q, k ~ N(0, 4^2),
    scale -9.4) gave dv 830x plain PyTorch's error."""
    torch.manual_seed(20261341)
    q, k, v = make_inputs(1, 2, Hk, L, 700, 111, 111, torch.float32)  # (>= 512 keys: the forward reads them in place)
    check_backend("cpu", (q * 4).detach(), (k * 4).detach(), v, CausalMode.NONE, scale=-9.405883514843914)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["window_padding_softcap", "alibi", "q_heads_broadcast", "mqa_one_kv_head"])
def test_decoding_step_with_gqa(case, dtype):
    """A decoding step with GQA (L = 1, 4 query heads per kv head): the forward stacks a kv head's query
    heads as one task's rows where nothing differs per head (a window, key padding, softcap) and keeps a task
    per query head where something does (ALiBi), where the heads' rows overlap (q broadcast over heads) or
    where stacking would leave a thread idle (one kv head); each against the fp64 reference."""
    torch.manual_seed(11)
    B, Hq, Hk, S = (1, 8, 1, 700) if case == "mqa_one_kv_head" else (3, 8, 2, 700)
    q, k, v = make_inputs(B, Hq, Hk, 1, S, 64, 64, dtype)
    kw = {}
    if case == "window_padding_softcap":
        pad = torch.tensor([0, 50, 650])
        kw = dict(window=(100, 0), attn_mask=(torch.arange(S) >= pad[:, None])[:, None, None, :], softcap=5.0)
    elif case == "alibi":
        kw = dict(alibi_slopes=torch.rand(Hq))
    elif case == "q_heads_broadcast":
        q = q[:, :1].expand(B, Hq, 1, 64)
    check_backend("cpu", q, k, v, CausalMode.NONE if kw else CausalMode.LOWER_RIGHT,
                  backward=case != "q_heads_broadcast", **kw)


SPLIT_MIN_KEYS = 512  # csrc/cpu/config.h's FWD_SPLIT_MIN_KEYS
_PADDED = torch.arange(2600) < torch.tensor([[900], [2500]])  # two sequences' keys, (B, S)
SPLIT_CASES = {  # (B, Hq, Hk, L, S, extra arguments), tasks fewer than the threads, keys read in place
    "decode_one_head": (1, 1, 1, 1, 3000, {}),
    "decode_window_alibi_softcap": (1, 1, 1, 1, 3000, dict(window=(700, 0), alibi_slopes=torch.tensor([0.05]),
                                                           softcap=4.0)),  # (the first chunks see no key)
    "prefill_chunk_gqa": (1, 2, 1, 7, 2900, {}),
    "key_padding_two_batches": (2, 1, 1, 1, 2600, dict(attn_mask=_PADDED[:, None, None, :])),
}


@pytest.mark.parametrize("threads", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_kv(case, dtype, threads):
    """Fewer tasks than threads (else no split), each over many keys read in place (a decoding step of one head,
    a small chunk of queries): the forward cuts each task's keys into chunks computed by separate threads and
    combines them through their row maxima and sums (split-KV, csrc/cpu/fwd_kernel.h). Against the fp64
    reference, forward and backward; the chunks the forward made are read back (last_forward_splits), and a
    NaN key in one chunk makes the rows that see it NaN, as without the split."""
    B, Hq, Hk, L, S, extra = SPLIT_CASES[case]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(21)
        q, k, v = make_inputs(B, Hq, Hk, L, S, 64, 48, dtype)
        mode = CausalMode.NONE if "attn_mask" in extra else CausalMode.LOWER_RIGHT
        check_backend("cpu", q, k, v, mode, **extra)
        splits, tasks = cpu._C.last_forward_splits(), B * Hq  # (one query block per head)
        if tasks < threads:
            assert 1 < splits <= -(-threads // tasks) and splits * SPLIT_MIN_KEYS <= S, splits
        else:
            assert splits == 1, splits
        kwargs = dict(enable_gqa=Hq != Hk, **sdpa_causal_args(mode, L, S), **extra)
        q, k, v = q.detach(), k.detach().clone(), v.detach()
        runs = [fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs) for _ in range(2)]
        assert torch.equal(*runs)  # bitwise, for a given thread count
        k[B - 1, 0, 2400] = float("nan")  # (a later chunk's key, which the last batch entry's rows see)
        got = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
        want = fused_attn.scaled_dot_product_attention(q, k, v, backend="reference", **kwargs)
        assert bool(want[B - 1].isnan().all()) and torch.equal(got.isnan(), want.isnan())
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_heads_and_query_blocks(mode, dtype, threads):
    """Several kv heads (GQA groups of 2), batches and query blocks per head: each worker
    thread packs the kv head of its task when that changes, and a causal task packs only
    the key blocks it reaches (PackedKV, csrc/cpu/fwd_kernel.h)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(*make_inputs(2, 4, 2, 300, 700, 40, 24, dtype), mode)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scores,scale", [("rising", None), ("falling", None), ("spread", None), ("spread", -0.2)])
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_lazy_softmax_reference(mode, scores, scale, dtype):
    """The forward's softmax (fp32: SoftmaxEpilogue, csrc/cpu/fwd_kernel.h; 16-bit:
    online_softmax_avx512, tile_ops.h) keeps each row's exp2 reference until a score passes
    it by more than LAZY_MAX_SLACK, then moves it and rescales (fp32) or recomputes (16-bit)
    the row's P so far. Scores that rise from key to key over ~40 log2 units (the reference
    moves mid-block: every few 64-key panels in fp32), that fall (only the first keys set
    it), and that spread widely at random, with a positive and a negative scale. (Dropping
    the fp32 rescale fails 8 of the 12 fp32 cases.) The ramps keep scores in [-28, 0]: where a row's scores
    sit near +-70, the one rounding of its fp32 lse (~4e-6 relative) is passed by any
    lse-based backward (ours, FlashAttention's) to every P of the row, and dq can exceed
    2x the error of PyTorch's softmax, which keeps P (ratio up to 2.5 over a +-200 ramp)."""
    q, k, v = make_inputs(1, 2, 1, 130, 1100, 72, 40, torch.float32)
    if scores == "spread":
        q, k = 3 * q, 4 * k
    else:
        ramp = torch.linspace(-80.0, 0.0, 1100)
        q[..., 0] = 3.0
        k[..., 0] = ramp if scores == "rising" else ramp.flip(0)
    check(q.to(dtype), k.to(dtype), v.to(dtype), mode, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hk", grid("gqa", "cpu"))
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_gqa(mode, Hk, dtype):
    check(*make_inputs(2, 6, Hk, 113, 203, 64, 64, dtype), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", grid("layouts", "cpu"))
def test_noncontiguous_inputs(layout, dtype):
    q, k, v = make_inputs(2, 3, 3, 113, 203, 72, 72, dtype, layout=layout)
    assert not all(t.is_contiguous() for t in (q, k, v))
    if layout == "mixed":
        assert not q.is_contiguous() and k.stride(-1) != 1 and v.stride(1) == 0
    check(q, k, v, CausalMode.UPPER_LEFT)


def test_lse_gradient_off():
    check(*make_inputs(1, 2, 2, 64, 64, 32, 32, torch.float32), CausalMode.NONE, with_lse_grad=False)


def test_rows_that_see_no_key():
    """Lower-right causal with L > S: the first L - S rows see nothing: zeros, -inf, zero grads."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 2, 203, 64, 40, 40, torch.float32))
    out, lse = fused_attn.attention_with_lse(q, k, v, attn_mask=causal_lower_right(203, 64), backend="cpu")
    (out.sum() + _finite(lse).sum()).backward()
    blind = 203 - 64
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isinf(lse[:, :, :blind]).all() and (lse[:, :, :blind] < 0).all()
    assert torch.isfinite(lse[:, :, blind:]).all()
    assert torch.equal(q.grad[:, :, :blind], torch.zeros_like(q.grad[:, :, :blind]))


def test_automatic_choice_uses_cpu_for_cpu_tensors():
    q, k, v = make_inputs(1, 2, 2, 17, 17, 16, 16, torch.float32)
    assert fused_attn.explain_dispatch(q, k, v)["cpu"] is None
    assert torch.equal(fused_attn.scaled_dot_product_attention(q, k, v),
                       fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu"))


def test_backward_is_deterministic():
    q, k, v = make_inputs(1, 6, 2, 203, 203, 64, 64, torch.float32)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        fused_attn.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True, backend="cpu").sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("Hq,Hk", [(1, 1), (4, 2)])
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_gradcheck_fp64(mode, Hq, Hk):
    L, S = (7, 5) if mode is CausalMode.LOWER_RIGHT else (5, 7)  # L > S: rows that see nothing
    q, k, v = (t.requires_grad_() for t in make_inputs(1, Hq, Hk, L, S, 6, 4, torch.float64))

    def f(q, k, v):
        out, lse = fused_attn.attention_with_lse(q, k, v, enable_gqa=True, backend="cpu", **sdpa_causal_args(mode, L, S))
        return out, _finite(lse)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_memory_grows_linearly_in_L():
    """Forward + backward at L = S in {256, 512, 1024}: the cpu backend's extra memory doubles
    with L (O(L)), with dropout too (the backward draws the keep mask again), the reference's quadruples (O(L * S)), proving the measurement sees it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every allocation on this thread, where the profiler records it
    try:
        peaks = {}
        for run, (backend, p_drop) in {"cpu": ("cpu", 0.0), "cpu dropout": ("cpu", 0.2),
                                       "reference": ("reference", 0.0)}.items():
            for L in (256, 512, 1024):
                q, k, v = (t.requires_grad_() for t in make_inputs(1, 4, 4, L, L, 64, 64, torch.float32))

                def step():
                    fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop,
                                                            backend=backend).sum().backward()

                peaks[run, L] = peak_memory_bytes(step)
    finally:
        torch.set_num_threads(threads)
    for backend, expected in (("cpu", 2.0), ("cpu dropout", 2.0), ("reference", 4.0)):
        growth = [peaks[backend, 2 * L] / peaks[backend, L] for L in (256, 512)]
        assert all(abs(g - expected) < 0.5 for g in growth), (backend, growth, peaks)
    # At L = 1024 the fused backend holds O(L) buffers (inputs, outputs, grads, transposed
    # copies: ~8 MB) where the reference holds (H, L, S) scores and probabilities (~100 MB).
    assert max(peaks["cpu", 1024], peaks["cpu dropout", 1024]) < peaks["reference", 1024] / 8, peaks


VEC_ISAS = ["avx512", "avx2", "baseline"]


@pytest.fixture(params=VEC_ISAS)
def portable_kernels(request):
    """The fallbacks CPUs without AVX-512 / AMX run (compiler-vectorised softmax, BLAS only),
    each version of their loops the CPU can run."""
    cpu._C.set_vec_isa(request.param)
    if cpu._C.vec_isa() != request.param:
        cpu._set_path(cpu.ISA)
        pytest.skip(f"the CPU cannot run the {request.param} loops")
    cpu._C.set_portable_only(True)
    yield
    cpu._set_path(cpu.ISA)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_portable_fallback(portable_kernels, mode, dtype):
    check(*make_inputs(1, 6, 2, 113, 203, 72, 40, dtype), mode)


def test_ops_register_fake_and_schema():
    """torch.library.opcheck: schemas, fake (meta) implementations, autograd registration."""
    q, k, v = make_inputs(1, 2, 1, 17, 23, 16, 8, torch.float32)
    out, lse = cpu.forward(q, k, v, int(CausalMode.LOWER_RIGHT), 0.25)
    torch.library.opcheck(torch.ops.fused_attn.cpu_fwd.default, (q, k, v, 2, 0.25))
    for dlse in (torch.randn_like(lse), None):
        torch.library.opcheck(torch.ops.fused_attn.cpu_bwd.default,
                              (torch.randn_like(out), dlse, q, k, v, out, lse, 2, 0.25))


def _cpu_best_vec_isa():
    """avx512, avx2 or baseline, from /proc/cpuinfo (x86-64-v4 / v3 as GCC reads them)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    if v3 | {"avx512f", "avx512bw", "avx512cd", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if v3 <= flags else "baseline"


def _in_subprocess(isa, code):
    """Run ``code`` after ``from fused_attn.ops import cpu`` in a fresh interpreter with FUSED_ATTN_CPU_ISA=isa."""
    env = dict(os.environ, FUSED_ATTN_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", "from fused_attn.ops import cpu\n" + code], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable", " Portable "])
def test_isa_env_selects_the_path(isa):
    """FUSED_ATTN_CPU_ISA picks the path once, at import; path() says which; the kernels run on it."""
    code = ("import torch, fused_attn\n"
            "from fused_attn.reference import attention\nfrom fused_attn.spec import CausalMode\n"
            "q, k, v = (torch.randn(1, 2, 37, 40) for _ in range(3))\n"
            "out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend='cpu')\n"
            "ref = attention(q.double(), k.double(), v.double(), causal=CausalMode.UPPER_LEFT)[0]\n"
            "err = (out.double() - ref).abs().max()\n"
            "print(cpu.ISA, cpu._C.has_avx512(), cpu._C.vec_isa(), float(err))\n"
            "print(cpu.path())")
    done = _in_subprocess(isa, code)
    assert done.returncode == 0, done.stderr[-3000:]
    first, path = done.stdout.strip().splitlines()[-2:]
    got_isa, avx512, vec, err = first.split()
    assert got_isa == isa.strip().lower()
    assert float(err) < 1e-5, done.stdout
    best = _cpu_best_vec_isa()
    want_avx512 = got_isa == "native" and best == "avx512"
    assert avx512 == str(want_avx512), done.stdout
    want_vec = {"native": best, "avx2": "baseline" if best == "baseline" else "avx2", "portable": "baseline"}[got_isa]
    assert vec == want_vec, done.stdout
    assert path.startswith("avx512" if want_avx512 else "portable"), path
    if not want_avx512:
        assert f"loops at {want_vec}" in path, path
    if got_isa == "avx2":
        assert "no hand-written AVX2 kernel" in path, path


@pytest.mark.parametrize("value", ["avx512", "sse2", "native,avx2"])
def test_isa_env_rejects_unknown_values(value):
    """An unknown FUSED_ATTN_CPU_ISA raises on first CPU use, naming the allowed values."""
    code = ("import torch, fused_attn\n"
            "fused_attn.scaled_dot_product_attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend='cpu')")
    env = dict(os.environ, FUSED_ATTN_CPU_ISA=value)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ValueError" in done.stderr and f"FUSED_ATTN_CPU_ISA={value!r}" in done.stderr, done.stderr[-3000:]
    for allowed in ("native", "portable", "avx2"):
        assert allowed in done.stderr.splitlines()[-1]
