"""The Triton kernels, executed on the CPU by Triton's interpreter (see conftest.py), on the
triton subset of the one case grid (tests/attn_cases.py), against the fp64 reference under
the 2x-PyTorch-error rule (attn_cases.check_backend): out, lse, dq, dk, dv."""
import pytest
import torch
import triton
import triton.language as tl

import fused_attn
from fused_attn.ops import triton_attention as T
from fused_attn.spec import CausalMode

from attn_cases import CAUSAL_MODES, check_backend, grid, make_inputs, mode_id

pytestmark = pytest.mark.skipif(not T.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")


# L against S: single rows and keys, a partial block, L > S and L < S, several blocks with ragged tails.
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
@pytest.mark.parametrize("L,S", grid("seqlens", "triton"))
def test_causal_and_lengths(device, mode, L, S):
    q, k, v = make_inputs(1, 2, 2, L, S, 64, 64, torch.float16, device)
    check_backend("triton", q, k, v, mode)


# The longest awkward length, 1023 (31 full interpreter blocks and a ragged one), against a
# short side and against itself (causal with a 100-key window: a few tiles per row block, as the
# interpreter is slow; one head).
@pytest.mark.parametrize("L,S,mode,window", [(1023, 17, CausalMode.LOWER_RIGHT, (-1, -1)),
                                             (17, 1023, CausalMode.NONE, (-1, -1)),
                                             (1023, 1023, CausalMode.UPPER_LEFT, (100, 0))],
                         ids=["L1023-S17", "L17-S1023", "L1023-window100"])
def test_length_1023(device, L, S, mode, window):
    q, k, v = make_inputs(1, 1, 1, L, S, 16, 16, torch.float32, device)
    check_backend("triton", q, k, v, mode, with_lse_grad=True, window=window)


@pytest.mark.skipif(not T.INTERPRETED, reason="the interpreter's patching of triton.language")
def test_interpreted_launch_patches_the_language_once(monkeypatch):
    """Inside our launches, nested @triton.jit calls do not patch triton.language again (Triton's
    interpreter does at every call: half an interpreted launch's time); outside them Triton's own
    behaviour is kept. The results are checked by every interpreted test."""
    from triton.runtime import interpreter
    calls = []
    original = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn.__name__) or original(fn))
    q, k, v = make_inputs(1, 1, 1, 70, 45, 16, 16, torch.float32)
    fused_attn.scaled_dot_product_attention(q, k, v, backend="triton")  # 3 x 2 tiles, helpers in each
    assert calls[0] == "_fwd_kernel" and len(calls) <= 2, calls  # the launch's, then tl.core's (tl.zeros)
    calls.clear()
    x = torch.ones(1)
    _add_one_kernel[(2,)](x)  # Triton's: the launch's patch, then one per nested call
    assert x.item() == 3.0 and calls == ["_add_one_kernel", "_add_one", "_add_one"], calls


@triton.jit
def _add_one(x):
    return x + 1


@triton.jit
def _add_one_kernel(X):
    tl.store(X, _add_one(tl.load(X)))


# every head-dim bucket, powers of two and not (masked inside the kernel), and Ev != E
@pytest.mark.parametrize("E,Ev", grid("head_dims", "triton"))
def test_head_dims(device, E, Ev):
    q, k, v = make_inputs(1, 2, 2, 45, 70, E, Ev, torch.float16, device)
    check_backend("triton", q, k, v, CausalMode.LOWER_RIGHT)


@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
@pytest.mark.parametrize("Hk", grid("gqa", "triton"))
def test_gqa(device, mode, Hk):
    q, k, v = make_inputs(2, 6, Hk, 50, 77, 32, 32, torch.float16, device)
    check_backend("triton", q, k, v, mode)


# fp32 (IEEE dots) and bf16 (dot operands upcast under the interpreter only, see the kernel header)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
@pytest.mark.parametrize("L,S", grid("seqlens", "triton", "seqlens_fp32_bf16"))
def test_dtypes(device, dtype, mode, L, S):
    q, k, v = make_inputs(1, 2, 1, L, S, 64, 64, dtype, device)
    check_backend("triton", q, k, v, mode)


@pytest.mark.parametrize("layout", grid("layouts", "triton"))
@pytest.mark.parametrize("mode", [CausalMode.NONE, CausalMode.UPPER_LEFT], ids=mode_id)
def test_strided_inputs(device, layout, mode):
    q, k, v = make_inputs(2, 4, 2, 66, 90, 48, 48, torch.float16, device, layout=layout)
    assert not q.is_contiguous() or not k.is_contiguous()
    check_backend("triton", q, k, v, mode)


@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=mode_id)
def test_lse_gradient(device, mode):
    """The lse output is differentiable (its gradient enters the backward as delta - dlse)."""
    q, k, v = make_inputs(1, 2, 2, 70, 45, 32, 32, torch.float32, device)
    check_backend("triton", q, k, v, mode, with_lse_grad=True)


def test_custom_scale(device):
    q, k, v = make_inputs(1, 2, 2, 33, 65, 64, 64, torch.float16, device)
    check_backend("triton", q, k, v, CausalMode.UPPER_LEFT, scale=0.3)


def test_rows_that_see_no_key_are_zero(device):
    """Lower-right with L > S: the first L - S rows see nothing: out 0, lse -inf, dq 0."""
    L, S = 80, 30
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 2, L, S, 32, 32, torch.float16, device))
    out, lse = fused_attn.attention_with_lse(q, k, v, attn_mask=torch.nn.attention.bias.causal_lower_right(L, S),
                                             backend="triton")
    assert torch.all(out[:, :, : L - S] == 0) and torch.all(torch.isneginf(lse[:, :, : L - S]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, L - S:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, : L - S] == 0) and torch.isfinite(q.grad).all()


def test_public_shapes(device):
    """3-D and 5-D inputs reach the kernels through the same canonical form."""
    for shape in [(3, 40, 32), (2, 2, 3, 40, 32)]:
        q, k, v = (torch.randn(shape, device=device, dtype=torch.float16) for _ in range(3))
        got = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        want = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")
        assert got.shape == want.shape == shape
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_backward_is_deterministic(device):
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 6, 2, 90, 75, 40, 40, torch.float16, device))
    grads = []
    for _ in range(2):
        out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 64), (64, 16)])
def test_other_block_shapes(device, monkeypatch, bm, bn):
    """Unequal blocks move where the causal diagonal and the ragged tails fall."""
    if not T.INTERPRETED:
        pytest.skip("block shapes are chosen by the autotuner when compiled")
    monkeypatch.setattr(T, "INTERPRETER_BLOCKS", {"BLOCK_M": bm, "BLOCK_N": bn})
    for mode in (CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT):
        for L, S in ((75, 50), (50, 75)):
            q, k, v = make_inputs(1, 2, 1, L, S, 32, 32, torch.float16, device)
            check_backend("triton", q, k, v, mode)


def test_config_pruning():
    """Every (kernel, head dim, dtype, arch) keeps a config; short sequences drop long blocks;
    the sm_90 forward keeps only wgmma-sized blocks."""
    for kind in ("fwd", "dkdv", "dq"):
        for d in (16, 64, 128, 256):
            for elem in (2, 4):
                for arch in (80, 86, 90):
                    kept = T.prune_configs(kind, d, d, elem, arch)
                    assert kept and all(c in T.CONFIGS[kind][elem] for c in kept)
        tiled = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        fitting = T.prune_configs(kind, 64, 64, 2, 90)
        short = T.prune_configs(kind, 64, 64, 2, 90, length=1)
        smallest = min(c.kwargs[tiled] for c in fitting)
        assert short and all(c in fitting for c in short)
        assert max(c.kwargs[tiled] for c in short) <= max(16, smallest)
    assert all(c.kwargs["BLOCK_M"] >= T.WGMMA_MIN_BLOCK_M for c in T.prune_configs("fwd", 128, 128, 2, 90))
    big = T.prune_configs("fwd", 128, 128, 2, 90, length=8192)
    assert any(c.kwargs["BLOCK_M"] == 128 for c in big)
    # misaligned inputs (unvectorised loads) get half the register budget: smaller tiles, never none
    for kind in ("fwd", "dkdv", "dq"):
        for d in (64, 128, 256):
            aligned, misaligned = (T.prune_configs(kind, d, d, 2, 90, aligned=a) for a in (True, False))
            assert misaligned and (set(misaligned) <= set(aligned) or len(misaligned) == 1)
    assert len(T.prune_configs("fwd", 128, 128, 2, 90, aligned=False)) < len(big)


def test_fp32_precision_follows_torch_setting(monkeypatch):
    monkeypatch.setattr(T, "allow_tf32", lambda: False)
    assert T._modes(torch.float32)[1] == "ieee"
    monkeypatch.setattr(T, "allow_tf32", lambda: True)
    assert T._modes(torch.float32)[1] == "tf32"
    assert T._modes(torch.float16)[1] == "ieee"
    assert T._modes(torch.bfloat16)[0] == T.INTERPRETED  # the interpreter-only bf16 upcast


def test_int64_offsets(device):
    """Batch 2's rows start past element 2**31 of q's storage; int32 offset arithmetic would wrap.
    The storage is 4 GiB of address space, but only the rows written here are ever touched."""
    L, E = 40, 32
    stride_b = 2 ** 30 + 64  # an i32 stride whose product with b = 2 does not fit in i32
    storage = torch.empty(2 * stride_b + L * E, dtype=torch.float16, device=device)
    q = storage.as_strided((3, 1, L, E), (stride_b, L * E, E, 1))
    with torch.no_grad():
        q.copy_(torch.randn(3, 1, L, E, device=device))
    k, v = (torch.randn(3, 1, 50, E, dtype=torch.float16, device=device) for _ in range(2))
    check_backend("triton", q, k, v, CausalMode.UPPER_LEFT)


@pytest.mark.parametrize("case", ["causal_none", "upper_left", "lower_right_L>S", "gqa_ev", "blhe", "tail_blocks"])
def test_tensor_descriptor_forward(device, monkeypatch, case):
    """The forward's Hopper path: Q, K, V, O as tensor descriptors (TMA), whose out-of-bounds
    reads give 0 and whose stores clip, in place of masked pointer loads and stores."""
    if not T.INTERPRETED:
        pytest.skip("compiled, the descriptor path is chosen by the device (sm_90)")
    monkeypatch.setattr(T, "INTERPRETER_TMA", True)
    mode, shape, layout = {
        "causal_none": (CausalMode.NONE, (1, 2, 2, 70, 45, 40, 40), "contiguous"),
        "upper_left": (CausalMode.UPPER_LEFT, (1, 2, 2, 45, 70, 64, 64), "contiguous"),
        "lower_right_L>S": (CausalMode.LOWER_RIGHT, (1, 2, 2, 77, 33, 72, 72), "contiguous"),
        "gqa_ev": (CausalMode.LOWER_RIGHT, (2, 6, 2, 50, 61, 32, 16), "contiguous"),
        "blhe": (CausalMode.UPPER_LEFT, (2, 4, 2, 66, 90, 48, 48), "blhe"),
        "tail_blocks": (CausalMode.LOWER_RIGHT, (1, 2, 1, 1, 1, 16, 16), "contiguous"),
    }[case]
    q, k, v = make_inputs(*shape, torch.float16, device, layout=layout)
    used = []
    monkeypatch.setattr(T, "_descriptor", (lambda f: lambda t: (used.append(t.shape), f(t))[1])(T._descriptor))
    check_backend("triton", q, k, v, mode)
    assert len(used) == 4  # q, k, v and out went through descriptors


def test_tensor_descriptor_needs_alignment(monkeypatch):
    """TMA on sm_90 and newer (arch None, the interpreter: INTERPRETER_TMA) for aligned fp16/bf16."""
    q, k, v = make_inputs(1, 2, 2, 20, 20, 40, 40, torch.float16)
    for arch in (90, 100, 120):
        assert T.use_tma((q, k, v), arch)
    assert not T.use_tma((q, k, v), 80) and not T.use_tma((q, k, v), 89)
    assert not T.use_tma((q[..., 1:33], k, v), 90)  # base not 16-byte aligned
    odd = torch.randn(1, 2, 20, 44, dtype=torch.float16)[..., :40]  # rows of 88 bytes
    assert not T.use_tma((odd, k, v), 90)
    broadcast = torch.randn(1, 2, 20, 40, dtype=torch.float16).expand(3, 2, 20, 40)  # batch stride 0
    assert not T.use_tma((broadcast, broadcast, broadcast), 90)
    assert not T.use_tma(tuple(t.float() for t in (q, k, v)), 90)  # fp32 keeps pointer loads
    monkeypatch.setattr(T, "INTERPRETER_TMA", True)
    assert T.use_tma((q, k, v), None)
    monkeypatch.setattr(T, "INTERPRETER_TMA", False)
    assert not T.use_tma((q, k, v), None)


def test_concurrent_threads(device):
    """Launches from 4 Python threads at once (forward and backward) give the single-thread result:
    the interpreter, which is not thread-safe, runs one launch at a time."""
    if not T.INTERPRETED:
        pytest.skip("the launch lock is for the interpreter")
    import sys
    import threading
    inputs = [make_inputs(1, 2, 2, 40, 50, 32, 32, torch.float16, device) for _ in range(4)]

    def run(q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        return (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))

    want = [run(*x) for x in inputs]
    got, errors = [None] * 4, []
    start = threading.Barrier(4)

    def worker(i):
        try:
            start.wait()
            got[i] = run(*inputs[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so unserialised launches do overlap
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert torch.equal(a, b)


def test_grid_spreads_heads_over_two_axes(device, monkeypatch):
    """CUDA's grid axes 1 and 2 hold at most 65535 programs each, so batch * heads is spread over
    both (y + z * Y), the last programs repeating the last head. Here the limit is made 4, so 14
    forward / 7 dK-dV head slices take grids (blocks, 4, 4) and (blocks, 4, 2) with extra programs."""
    if not T.INTERPRETED:
        pytest.skip("the limit is patched for the interpreter")
    monkeypatch.setattr(T, "MAX_GRID_YZ", 4)
    grids = []
    monkeypatch.setattr(T, "_grid", (lambda f: lambda *a: (grids.append(f(*a)), grids[-1])[1])(T._grid))
    q, k, v = make_inputs(7, 2, 1, 40, 33, 16, 16, torch.float16, device)
    check_backend("triton", q, k, v, CausalMode.LOWER_RIGHT)
    meta = {"BLOCK_M": 32, "BLOCK_N": 32}
    assert [g(meta) for g in grids] == [(2, 4, 4), (2, 4, 4), (2, 4, 4), (2, 4, 2)]  # fwd, pre, dq, dkdv


def test_grid_limits():
    """Up to 65535 head slices use one grid row (z = 1); more spread over y and z within 65535."""
    for heads, length, want in [(1, 1, (1, 1, 1)), (65535, 4096, (64, 65535, 1)), (65536, 64, (1, 32768, 2)),
                                (3 * 65535 + 1, 100, (2, 49152, 4))]:
        y, z = want[1], want[2]
        assert T._grid(length, heads, "BLOCK_M")({"BLOCK_M": 64}) == want
        assert y * z >= heads > y * z - z and y <= T.MAX_GRID_YZ
    with pytest.raises(ValueError, match="exceed CUDA's grid"):
        T._grid(10, 65535 ** 2 + 1, "BLOCK_M")({"BLOCK_M": 16})


SPLIT_CASES = {  # (B, Hq, Hk, L, S, extra arguments, tensor descriptors): fewer programs than SMs
    "decode_one_head": (1, 1, 1, 1, 300, {}, False),
    "decode_gqa_key_padding_tma": (1, 2, 1, 1, 300, dict(attn_mask=(torch.arange(300) < 230)[None, None, None, :]),
                                   True),
    "chunk_causal_window": (1, 2, 2, 5, 270, dict(window=(150, 0)), False),  # (the first chunk sees no key)
    "decode_softcap_alibi": (1, 1, 1, 1, 260, dict(softcap=3.0, alibi_slopes=torch.tensor([0.05])), False),
}


# (tensor descriptors carry 16-bit inputs only: the descriptor case runs fp16 and bf16)
SPLIT_PARAMS = [(case, dtype) for case in SPLIT_CASES for dtype in (torch.float32, torch.bfloat16, torch.float16)
                if not (SPLIT_CASES[case][6] and dtype == torch.float32)]


@pytest.mark.parametrize("case,dtype", SPLIT_PARAMS, ids=[f"{c}-{str(d).replace('torch.', '')}" for c, d in SPLIT_PARAMS])
def test_split_kv(device, monkeypatch, case, dtype):
    """Split-KV (SPLIT, see the module docstring): a forward with fewer programs than SMs over many keys runs
    each row block's key chunks as programs of their own and combines them (combine_splits); forward and
    backward against the fp64 reference. Chunks of 64 keys here (SPLIT_MIN_KEYS; the interpreter counts 4
    SMs), so short inputs split into several."""
    B, Hq, Hk, L, S, extra, tma = SPLIT_CASES[case]
    monkeypatch.setattr(T, "SPLIT_MIN_KEYS", 64)
    monkeypatch.setattr(T, "INTERPRETER_TMA", tma)
    splits = []
    combine = T.combine_splits
    monkeypatch.setattr(T, "combine_splits", lambda po, *a: splits.append(po.shape[0]) or combine(po, *a))
    q, k, v = make_inputs(B, Hq, Hk, L, S, 32, 24, dtype, device)
    extra = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in extra.items()}
    mode = CausalMode.NONE if "attn_mask" in extra else CausalMode.LOWER_RIGHT
    check_backend("triton", q, k, v, mode, with_lse_grad=True, **extra)
    sms = T.device_sms(q.device)
    want = T.split_plan(B, Hq, L, S, sms, False, False)[0]
    assert want > 1 and splits == [want], (splits, want)


def test_split_plan():
    """Chunks of whole tiles (SPLIT_CHUNK_ALIGN), at least SPLIT_MIN_KEYS, enough to fill the SMs, at most
    MAX_SPLITS; none where the programs fill the GPU, with varlen or dropout, or for few keys."""
    assert T.split_plan(1, 32, 1, 32768, 132, False, False) == (5, 6656)  # 32 programs: 5 chunks fill 132 SMs
    assert T.split_plan(1, 1, 1, 32768, 132, False, False) == (16, 2048)  # MAX_SPLITS
    assert T.split_plan(1, 8, 1, 2000, 132, False, False) == (3, 768)  # at least 512 keys: 3 chunks
    assert T.split_plan(5, 32, 1, 32768, 132, False, False) == (1, 32768)  # 160 programs: enough
    assert T.split_plan(1, 1, 1, 1000, 132, False, False) == (1, 1000)  # fewer than 2 x 512 keys
    assert T.split_plan(1, 1, 1, 8192, 132, True, False)[0] == 1  # varlen
    assert T.split_plan(1, 1, 1, 8192, 132, False, True)[0] == 1  # dropout
    for B, H, L, S in [(1, 3, 1, 5000), (2, 1, 70, 9999), (1, 1, 1, 1024)]:
        n, chunk = T.split_plan(B, H, L, S, 132, False, False)
        assert chunk % T.SPLIT_CHUNK_ALIGN == 0 and chunk >= T.SPLIT_MIN_KEYS and (n - 1) * chunk < S <= n * chunk
