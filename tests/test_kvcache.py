"""fused_attn.attention_with_kvcache: FlashAttention-2's ``flash_attn_with_kvcache`` semantics (in-place
append at each batch's cache length, per-batch key counts, causal / window / ALiBi aligned bottom-right to
each batch's count, contiguous or paged caches, GQA).

The oracle is built independently of the function's own steps: for each batch entry, the cache's first
cache_seqlens[b] keys concatenated with the new ones (what a user without this function does), through
``reference.attention`` (lower-right causal) in fp64, and in the inputs' dtype for the tolerance rule's
baseline. Every slot of a cache past its length holds NaN, so a kernel that reads one fails.
"""
import pytest
import torch

import fused_attn
from fused_attn import dispatch, reference
from fused_attn.problem import make_kvcache_problem
from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close, peak_memory_bytes, stores_bf16_by_truncation

HQ, HK, E, EV = 4, 2, 32, 24


def _caches(B, S_max, dtype, gen, lengths, layout, block_size=16):
    """Caches holding random keys up to each batch's length and NaN after it: (k_cache, v_cache, block_table,
    the keys and values by batch as lists of (Hk, n, E) tensors). ``layout``: "contiguous" (B, Hk, S_max, E),
    "bshd" (FlashAttention's (B, S, H, E) passed as a transpose view) or "paged" (blocks in a shuffled
    order, block_size rows each, with spare blocks)."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    keys = [torch.randn(HK, n, E, generator=gen, dtype=draw).to(dtype) for n in lengths]
    values = [torch.randn(HK, n, EV, generator=gen, dtype=draw).to(dtype) for n in lengths]
    if layout == "paged":
        per_batch = -(-S_max // block_size)
        num_blocks = B * per_batch + 3
        order = torch.randperm(num_blocks, generator=gen)[:B * per_batch].reshape(B, per_batch).to(torch.int32)
        k_cache = torch.full((num_blocks, HK, block_size, E), float("nan"), dtype=dtype)
        v_cache = torch.full((num_blocks, HK, block_size, EV), float("nan"), dtype=dtype)
        for b, n in enumerate(lengths):
            for j in range(n):
                blk, row = int(order[b, j // block_size]), j % block_size
                k_cache[blk, :, row] = keys[b][:, j]
                v_cache[blk, :, row] = values[b][:, j]
        return k_cache, v_cache, order, keys, values
    if layout == "bshd":
        k_cache = torch.full((B, S_max, HK, E), float("nan"), dtype=dtype).transpose(1, 2)
        v_cache = torch.full((B, S_max, HK, EV), float("nan"), dtype=dtype).transpose(1, 2)
    else:
        k_cache = torch.full((B, HK, S_max, E), float("nan"), dtype=dtype)
        v_cache = torch.full((B, HK, S_max, EV), float("nan"), dtype=dtype)
    for b, n in enumerate(lengths):
        k_cache[b, :, :n] = keys[b]
        v_cache[b, :, :n] = values[b]
    return k_cache, v_cache, None, keys, values


def _oracle(q, keys, values, k_new, v_new, causal, window, alibi, softcap, compute_dtype):
    """Per batch entry: attention of q[b] over its cached keys concatenated with the new ones."""
    outs, lses = [], []
    mode = CausalMode.LOWER_RIGHT if causal else CausalMode.NONE
    for b in range(q.shape[0]):
        kb, vb = keys[b], values[b]
        if k_new is not None:
            kb, vb = torch.cat((kb, k_new[b]), 1), torch.cat((vb, v_new[b]), 1)
        if kb.shape[1] == 0:
            dt = compute_dtype or q.dtype
            outs.append(torch.zeros(1, HQ, q.shape[2], EV, dtype=dt))
            lses.append(torch.full((1, HQ, q.shape[2]), float("-inf"), dtype=dt))
            continue
        o, lse = reference.attention(q[b:b + 1], kb[None], vb[None], None, 0.0, mode, window=window,
                                     alibi_slopes=None if alibi is None else alibi[None].expand(1, HQ),
                                     softcap=softcap, compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _check(backend, dtype, layout, lengths, L, L_new, causal=True, window=(-1, -1), alibi=False, softcap=0.0,
           S_max=48, device="cpu"):
    gen = torch.Generator().manual_seed(11)
    B = len(lengths)
    k_cache, v_cache, table, keys, values = _caches(B, S_max, dtype, gen, lengths, layout)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, HQ, L, E, generator=gen, dtype=draw).to(dtype)
    k_new = torch.randn(B, HK, L_new, E, generator=gen, dtype=draw).to(dtype) if L_new else None
    v_new = torch.randn(B, HK, L_new, EV, generator=gen, dtype=draw).to(dtype) if L_new else None
    slopes = torch.rand(HQ, generator=gen) * 0.5 if alibi else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before_k = k_cache.clone()
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    k_dev, v_dev = to(k_cache), to(v_cache)
    with torch.no_grad():
        out, lse = fused_attn.attention_with_kvcache(
            to(q), k_dev, v_dev, to(k_new), to(v_new), cache_seqlens=to(seqlens), block_table=to(table),
            causal=causal, window=window, alibi_slopes=to(slopes), softcap=softcap, return_lse=True,
            backend=backend)
    assert torch.equal(seqlens, torch.tensor(lengths, dtype=torch.int32)), "cache_seqlens changed"
    out, lse, k_after = out.cpu(), lse.cpu(), k_dev.cpu()
    assert out.shape == (B, HQ, L, EV) and lse.shape == (B, HQ, L)
    # the append: the new keys at each batch's length, every other slot as it was (NaN stays NaN)
    expect = before_k.clone()
    for b, n in enumerate(lengths):
        for j in range(L_new):
            if table is None:
                expect[b, :, n + j] = k_new[b, :, j]
            else:
                expect[int(table[b, (n + j) // k_cache.shape[2]]), :, (n + j) % k_cache.shape[2]] = k_new[b, :, j]
    assert torch.equal(k_after.nan_to_num(7.0), expect.nan_to_num(7.0)), "the append wrote the wrong slots"
    ref = _oracle(q, keys, values, k_new, v_new, causal, window, slopes, softcap, torch.float64)
    base = _oracle(q, keys, values, k_new, v_new, causal, window, slopes, softcap, None)
    truncated = stores_bf16_by_truncation(backend, dtype)
    assert_close(out, ref[0], base[0], "out", truncated_bf16=truncated)
    assert_close(lse, ref[1], base[1].float() if dtype != torch.float64 else base[1], "lse", dtype=dtype)


# (lengths per batch entry, query rows, appended tokens): ragged with an empty and a full cache (S_max 48),
# decoding (1 row, 1 token), chunked prefill (5 rows and tokens), no append, more rows than keys.
SHAPES = {
    "decode_ragged": ([0, 17, 47, 30], 1, 1),
    "prefill_chunk": ([0, 9, 43, 32], 5, 5),
    "no_append_full": ([48, 3, 0, 20], 3, 0),
    "rows_past_keys": ([2, 0, 40], 6, 3),
}
FEATURES = {"causal": dict(), "full": dict(causal=False), "window": dict(window=(6, 0)),
            "alibi_softcap": dict(alibi=True, softcap=2.0)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CPU_CASES = ([(s, f, torch.float32, lay) for s in SHAPES for f in FEATURES for lay in ("contiguous", "paged")]
             + [(s, "causal", d, "contiguous") for s in SHAPES for d in DTYPES[1:]]
             + [("decode_ragged", f, torch.bfloat16, lay) for f in ("window", "alibi_softcap")
                for lay in ("bshd", "paged")]
             + [("prefill_chunk", "causal", torch.float16, "paged")])


@pytest.mark.parametrize("shape,feature,dtype,layout", CPU_CASES,
                         ids=[f"{s}-{f}-{str(d).replace('torch.', '')}-{lay}" for s, f, d, lay in CPU_CASES])
def test_kvcache_cpu_matches_concatenated_caches(shape, feature, dtype, layout):
    lengths, L, L_new = SHAPES[shape]
    _check("cpu", dtype, layout, lengths, L, L_new, **FEATURES[feature])


@pytest.mark.parametrize("layout", ("contiguous", "paged"))
def test_kvcache_reference_backend_matches_concatenated_caches(layout):
    """The reference backend's own path (reference.cached_attention) against the independent oracle."""
    _check("reference", torch.float32, layout, [0, 17, 47, 30], 5, 1, window=(9, 0), alibi=True)


TRITON_CASES = [("decode_ragged", "window", torch.float32, "contiguous"),
                ("prefill_chunk", "alibi_softcap", torch.float32, "paged"),
                ("rows_past_keys", "full", torch.float32, "bshd"),
                ("prefill_chunk", "causal", torch.bfloat16, "contiguous")]


@pytest.mark.parametrize("shape,feature,dtype,layout", TRITON_CASES,
                         ids=[f"{s}-{f}-{str(d).replace('torch.', '')}-{lay}" for s, f, d, lay in TRITON_CASES])
def test_kvcache_triton_matches_concatenated_caches(device, shape, feature, dtype, layout):
    """The Triton forward's SEQLENS path (each batch's count as its S, see triton_attention's docstring); a
    cache longer than the interpreter's 32-key blocks, so the counts end inside and across blocks."""
    lengths, L, L_new = SHAPES[shape]
    _check("triton", dtype, layout, lengths, L, L_new, device=device, S_max=80, **FEATURES[feature])


def test_kvcache_decoding_loop_equals_full_attention():
    """Prefill a prompt, then decode token by token with cache_seqlens advanced by the caller: each step's
    output equals causal attention over the whole sequence at that row (GQA, a (B, S, H, E) cache)."""
    gen = torch.Generator().manual_seed(5)
    B, S_max, prompt, steps = 2, 40, 7, 6
    total = prompt + steps
    q = torch.randn(B, HQ, total, E, generator=gen)
    k = torch.randn(B, HK, total, E, generator=gen)
    v = torch.randn(B, HK, total, EV, generator=gen)
    k_cache = torch.full((B, S_max, HK, E), float("nan")).transpose(1, 2)
    v_cache = torch.full((B, S_max, HK, EV), float("nan")).transpose(1, 2)
    full = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="reference")
    lengths = torch.zeros(B, dtype=torch.int32)
    with torch.no_grad():
        out = fused_attn.attention_with_kvcache(q[:, :, :prompt], k_cache, v_cache, k[:, :, :prompt], v[:, :, :prompt],
                                                cache_seqlens=lengths)
        torch.testing.assert_close(out, full[:, :, :prompt], atol=2e-6, rtol=1e-5)
        lengths += prompt
        for t in range(prompt, total):
            out = fused_attn.attention_with_kvcache(q[:, :, t:t + 1], k_cache, v_cache, k[:, :, t:t + 1],
                                                    v[:, :, t:t + 1], cache_seqlens=lengths)
            torch.testing.assert_close(out, full[:, :, t:t + 1], atol=2e-6, rtol=1e-5)
            lengths += 1
    assert torch.equal(k_cache[:, :, :total], k) and bool(k_cache[:, :, total:].isnan().all())


def test_kvcache_reads_strided_caches_in_place():
    """A FlashAttention-layout cache (B, S, H, E) passed as a transpose view is read where it is: the call
    allocates far less than one cache (the output, the lse, the kernels' scratch), and the append lands in
    the caller's tensor."""
    gen = torch.Generator().manual_seed(8)
    B, S_max = 2, 4096
    k_store, v_store = torch.randn(B, S_max, HK, E, generator=gen), torch.randn(B, S_max, HK, EV, generator=gen)
    q, k, v = (torch.randn(B, h, 1, d, generator=gen) for h, d in ((HQ, E), (HK, E), (HK, EV)))
    lengths = torch.tensor([4000, 1234], dtype=torch.int32)

    def call():
        with torch.no_grad():
            fused_attn.attention_with_kvcache(q, k_store.transpose(1, 2), v_store.transpose(1, 2), k, v,
                                              cache_seqlens=lengths, backend="cpu")
    peak = peak_memory_bytes(call)
    assert peak < k_store.nbytes // 8, f"{peak} bytes allocated for a {k_store.nbytes}-byte cache"
    assert torch.equal(k_store[0, 4000], k[0, :, 0]) and torch.equal(v_store[1, 1234], v[1, :, 0])


def test_kvcache_int_and_default_lengths():
    """cache_seqlens as an int applies to every batch entry; None means every cache is full."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, HQ, 1, E, generator=gen)
    k_cache, v_cache = torch.randn(2, HK, 9, E, generator=gen), torch.randn(2, HK, 9, EV, generator=gen)
    with torch.no_grad():
        full = fused_attn.attention_with_kvcache(q, k_cache, v_cache)
        five = fused_attn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=5)
    want_full = fused_attn.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True, backend="reference")
    want_five = fused_attn.scaled_dot_product_attention(q, k_cache[:, :, :5], v_cache[:, :, :5], enable_gqa=True,
                                                        backend="reference")
    torch.testing.assert_close(full, want_full)
    torch.testing.assert_close(five, want_five)


def _bad_call(**change):
    gen = torch.Generator().manual_seed(1)
    args = dict(q=torch.randn(2, HQ, 1, E, generator=gen), k_cache=torch.randn(2, HK, 8, E, generator=gen),
                v_cache=torch.randn(2, HK, 8, EV, generator=gen), k=torch.randn(2, HK, 1, E, generator=gen),
                v=torch.randn(2, HK, 1, EV, generator=gen), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32))
    args.update(change)
    return args


BAD = {
    "overflow": (dict(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)), ValueError,
                 "appending 1 tokens to batch 1's cache of 8 overflows its capacity of 8"),
    "length_past_capacity": (dict(k=None, v=None, cache_seqlens=torch.tensor([3, 9])), ValueError,
                             r"cache_seqlens\[1\] = 9 is not in \[0, 8\]"),
    "negative_length": (dict(cache_seqlens=-1), ValueError, r"cache_seqlens\[0\] = -1"),
    "float_lengths": (dict(cache_seqlens=torch.tensor([3.0, 7.0])), TypeError, "cache_seqlens must be None, an int"),
    "k_without_v": (dict(v=None), ValueError, "k and v come together"),
    "new_heads_differ": (dict(k=torch.randn(2, HQ, 1, E)), ValueError, r"k must be \(B, Hk, L_new, head dim\)"),
    "new_dtype_differs": (dict(k=torch.randn(2, HK, 1, E, dtype=torch.float64)), TypeError,
                          "k must have its cache's dtype"),
    "cache_batch_differs": (dict(k_cache=torch.randn(3, HK, 8, E), v_cache=torch.randn(3, HK, 8, EV)), ValueError,
                            r"k_cache must be \(B, Hk, S_max, E\) and v_cache the same"),
    "gqa_not_dividing": (dict(q=torch.randn(2, 3, 1, E)), ValueError, "query heads must be a multiple"),
    "paged_overflow": (dict(k_cache=torch.randn(4, HK, 4, E), v_cache=torch.randn(4, HK, 4, EV),
                            block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                            cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)), ValueError,
                       "overflows its capacity of 8 \\(block_table columns x block_size\\)"),
    "paged_table_rank": (dict(k_cache=torch.randn(4, HK, 4, E), v_cache=torch.randn(4, HK, 4, EV),
                              block_table=torch.tensor([0, 1], dtype=torch.int32)), TypeError,
                         r"block_table must be an int32 / int64 tensor of shape \(2, max_blocks\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_kvcache_bad_input_says_what_and_why(case):
    change, error, message = BAD[case]
    args = _bad_call(**change)
    k_cache = args["k_cache"].clone()
    with torch.no_grad(), pytest.raises(error, match=message):
        fused_attn.attention_with_kvcache(**args)
    assert torch.equal(args["k_cache"], k_cache), "a refused call changed the cache"


def test_kvcache_paged_block_outside_the_cache_names_it():
    """A table entry outside the cache is an error where its batch uses it (here after the append), and
    ignored where it does not (tables padded with -1, as vLLM's)."""
    blocks = dict(k_cache=torch.randn(4, HK, 4, E), v_cache=torch.randn(4, HK, 4, EV))
    args = _bad_call(**blocks, block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32),
                     cache_seqlens=torch.tensor([4, 6], dtype=torch.int32))
    k_cache = args["k_cache"].clone()
    with torch.no_grad(), pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9 is not a block of the cache "
                                                          r"\(0 \.\. 3\), and batch 0 uses it"):
        fused_attn.attention_with_kvcache(**args)
    assert torch.equal(args["k_cache"], k_cache), "a refused call changed the cache"
    args = _bad_call(**blocks, block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32),
                     cache_seqlens=torch.tensor([3, 6], dtype=torch.int32))
    with torch.no_grad():
        out = fused_attn.attention_with_kvcache(**args)
    assert out.shape == (2, HQ, 1, EV) and bool(out.isfinite().all())


def test_kvcache_refuses_gradients():
    args = _bad_call()
    args["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="computes no gradients"):
        fused_attn.attention_with_kvcache(**args)


def test_kvcache_cuda_backend_refuses_by_name():
    """The CUDA kernels do not take per-batch key counts: asked for by name, the refusal says so."""
    args = _bad_call()
    with torch.no_grad(), pytest.raises(Exception, match="per-sequence key counts"):
        fused_attn.attention_with_kvcache(**args, backend="cuda")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_stored_key_counts_cpu_backward(dtype):
    """The CPU kernels' per-batch key counts (Problem.seqlens_k) forward and backward, through the op's
    autograd formula, against reference.cached_attention: slots past each count hold NaN and get zero
    gradients (attention_with_kvcache itself computes no gradients; the op's backward is still right)."""
    gen = torch.Generator().manual_seed(4)
    B, L, S = 3, 3, 200
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, HQ, L, E, generator=gen, dtype=draw).to(dtype)
    k = torch.randn(B, HK, S, E, generator=gen, dtype=draw).to(dtype)
    v = torch.randn(B, HK, S, EV, generator=gen, dtype=draw).to(dtype)
    counts = torch.tensor([0, 70, 150])
    for b in range(B):
        k[b, :, counts[b]:] = float("nan")
        v[b, :, counts[b]:] = float("nan")
    dout = torch.randn(B, HQ, L, EV, generator=gen, dtype=draw).to(dtype)
    dlse = torch.randn(B, HQ, L, generator=gen)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        seen = torch.isfinite(lse)
        total = (out.double() * dout.double()).sum() + (torch.where(seen, lse.double(), 0.0) * dlse.double()).sum()
        return (out.detach(), lse.detach(), *torch.autograd.grad(total, leaves))

    def ours(q, k, v):
        p = make_kvcache_problem(q, k, v, False, window=(50, 0))
        p.seqlens_k = counts
        return dispatch.run(p, "cpu")

    def oracle(compute_dtype):
        return lambda q, k, v: reference.cached_attention(q, k, v, counts, CausalMode.LOWER_RIGHT, window=(50, 0),
                                                          compute_dtype=compute_dtype)
    got, ref, base = run(ours), run(oracle(torch.float64)), run(oracle(None))
    for name, g, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        assert_close(g, r, b, name, dtype=dtype)
    assert bool((got[3][0] == 0).all()) and bool((got[4][2, :, 150:] == 0).all())
