"""Which keys a query sees beyond causal masks: sliding windows and key-padding masks.

The public API takes ``window=(left, right)`` (FlashAttention-2's ``window_size``, aligned
bottom-right) and recognises key-padding masks ((N..., 1, 1, S) masks admitting one run of
consecutive keys per batch entry) as per-batch key bounds (``Problem.key_bounds``); the CPU
kernels run both (fused_attn/ops/cpu.py), the reference backend builds them as masks
(spec.visible_keys). Every kernel case is checked forward, lse and backward against the fp64
reference given the same window and the same mask *tensor*, so the normalisation into key
bounds is checked too. The Triton kernels' cases are in test_triton_visibility.py.
"""
import pytest
import torch

import fused_attn
from fused_attn.problem import make_problem
from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close

from attn_cases import MASK_GRAD_CASES, check_backend, check_mask_gradient, make_inputs

B, HQ, HK = 2, 4, 2

# id -> (L, S, causal mode, window, per-batch key runs [begin, end) of the padding mask or None)
CASES = {
    "win16_16": (113, 203, CausalMode.NONE, (16, 16), None),
    "win_left5_causal_lower_right": (113, 203, CausalMode.LOWER_RIGHT, (5, -1), None),
    "win_right3_L_gt_S": (203, 97, CausalMode.NONE, (-1, 3), None),
    "win0_0_diagonal_only": (64, 64, CausalMode.NONE, (0, 0), None),
    "win_wider_than_S": (17, 64, CausalMode.UPPER_LEFT, (500, 500), None),
    "win_local_causal_upper_left": (203, 203, CausalMode.UPPER_LEFT, (33, 0), None),
    "win_left_crosses_blocks": (600, 700, CausalMode.NONE, (130, 7), None),  # CPU key blocks of 512 / 128
    "win_sees_nothing": (113, 203, CausalMode.UPPER_LEFT, (5, -1), None),  # causal upper-left hides the window
    "pad_right": (113, 203, CausalMode.NONE, (-1, -1), [(0, 150), (0, 203)]),
    "pad_left": (97, 203, CausalMode.NONE, (-1, -1), [(40, 203), (0, 202)]),
    "pad_empty_row": (17, 64, CausalMode.NONE, (-1, -1), [(0, 0), (5, 60)]),
    "pad_one_key": (113, 203, CausalMode.NONE, (-1, -1), [(70, 130), (1, 2)]),
    "pad_causal_upper_left": (203, 203, CausalMode.UPPER_LEFT, (-1, -1), [(0, 120), (9, 203)]),
    "pad_and_window": (113, 700, CausalMode.NONE, (40, 3), [(0, 640), (300, 700)]),
    "pad_across_key_blocks": (600, 1100, CausalMode.UPPER_LEFT, (-1, -1), [(100, 1050), (513, 1100)]),
    "L1023_pad_and_local_causal": (1023, 1023, CausalMode.UPPER_LEFT, (100, 0), [(0, 1000), (23, 1023)]),
    "L1_S1023_pad": (1, 1023, CausalMode.NONE, (-1, -1), [(0, 1023), (511, 1023)]),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _padding_mask(runs, S, dtype=torch.bool):
    """(B, 1, 1, S) mask admitting keys [begin, end) of each batch entry: bool, or float 0 / -inf."""
    keep = torch.zeros(len(runs), 1, 1, S, dtype=torch.bool)
    for b, (begin, end) in enumerate(runs):
        keep[b, ..., begin:end] = True
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))


# The reference backend computes 16-bit inputs in fp32: its fp32 and fp64 runs cover it.
RUNS = [pytest.param(backend, dtype, id=f"{backend}-{str(dtype).replace('torch.', '')}")
        for backend, dtypes in (("cpu", DTYPES), ("reference", (torch.float32, torch.float64))) for dtype in dtypes]


# L or S = 1023 (CI time): the cpu kernels in fp32 and bf16 only.
LONG_DTYPES = (torch.float32, torch.bfloat16)


def _grid(cases, runs):
    return [pytest.param(*run.values, case, id=f"{run.id}-{case}") for case in cases for run in runs
            if max(cases[case][:2]) < 1023 or (run.values[0] == "cpu" and run.values[1] in LONG_DTYPES)]


@pytest.mark.parametrize("backend,dtype,case", _grid(CASES, RUNS))
def test_window_and_key_padding_match_the_reference(backend, dtype, case):
    L, S, mode, window, runs = CASES[case]
    q, k, v = make_inputs(B, HQ, HK, L, S, 32, 24, dtype, layout="blhe" if case.startswith("pad") else "contiguous")
    mask = None if runs is None else _padding_mask(runs, S)
    if mask is not None:  # the kernels get key bounds, not the mask
        p = make_problem(q, k, v, mask, is_causal=mode is CausalMode.UPPER_LEFT, enable_gqa=True, window=window)
        assert p.mask is None and p.key_bounds.tolist() == [list(r) for r in runs]
        assert "key_padding" in p.features()
    check_backend(backend, q, k, v, mode, with_lse_grad=True, window=window, attn_mask=mask)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_float_padding_mask_runs_as_key_bounds(dtype):
    """HF-style additive masks (0 where seen, -inf where padded) in the inputs' dtype or fp32."""
    q, k, v = make_inputs(B, HQ, HK, 33, 90, 16, 16, dtype)
    runs = [(0, 70), (12, 90)]
    for mask_dtype in {dtype, torch.float32}:
        mask = _padding_mask(runs, 90, mask_dtype)
        assert make_problem(q, k, v, mask, enable_gqa=True).key_bounds.tolist() == [list(r) for r in runs]
        check_backend("cpu", q, k, v, CausalMode.NONE, attn_mask=mask)


def test_which_masks_become_key_bounds():
    q, k, v = make_inputs(2, 3, 3, 5, 9, 8, 8, torch.float32)
    bounds = lambda m, **kw: make_problem(q, k, v, m, **kw)  # noqa: E731
    right = _padding_mask([(0, 6), (0, 9)], 9)
    p = bounds(right)
    assert p.mask is None and p.key_bounds.tolist() == [[0, 6], [0, 9]]
    # shapes that broadcast the same way: (1, S) and (S,) pad every batch entry alike, (B, 1, 1, 1, S) too
    assert bounds(right[0, 0]).key_bounds.tolist() == [[0, 6], [0, 6]]
    assert bounds(right[0, 0, 0]).key_bounds.tolist() == [[0, 6], [0, 6]]
    # no padding at all: no mask and no bounds (the unmasked kernels)
    p = bounds(torch.ones(2, 1, 1, 9, dtype=torch.bool))
    assert p.mask is None and p.key_bounds is None and p.features() == frozenset()
    # a batch entry that sees nothing: the empty range
    assert bounds(_padding_mask([(0, 0), (3, 4)], 9)).key_bounds.tolist() == [[0, 0], [3, 4]]
    # not a padding mask: a hole inside the run, per-query rows, per-head masks, float values other
    # than 0 / -inf, a float mask that requires grad: these stay masks
    holes = right.clone()
    holes[0, ..., 2] = False
    per_query = right.expand(2, 1, 5, 9).clone()
    per_query[0, 0, 1, 0] = False
    per_head = right.expand(2, 3, 1, 9).clone()
    per_head[0, 1, 0, 0] = False
    bias = _padding_mask([(0, 6), (0, 9)], 9, torch.float32)
    scaled = bias.clone()
    scaled[0, ..., 0] = -1.0
    trained = bias.clone().requires_grad_()
    for mask in (holes, per_query, per_head, scaled, trained):
        p = bounds(mask)
        assert p.key_bounds is None and p.mask is not None


@pytest.mark.parametrize("window", [(-2, 0), (0, -3), (1.5, 2), (True, 1), (1, 2, 3), "ab", 4])
def test_bad_window_is_refused(window):
    q, k, v = make_inputs(1, 2, 2, 4, 4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"window must be a pair \(left, right\) of ints >= -1"):
        fused_attn.scaled_dot_product_attention(q, k, v, window=window)


def test_backends_say_what_they_run():
    q, k, v = make_inputs(1, 2, 2, 4, 6, 8, 8, torch.float32)
    why = fused_attn.explain_dispatch(q, k, v, window=(2, 0))
    assert why["cpu"] is None and why["reference"] is None
    assert why["cuda"].startswith("a sliding window is not supported")
    why = fused_attn.explain_dispatch(q, k, v, _padding_mask([(0, 3)], 6))
    assert why["cpu"] is None and why["cuda"].startswith("a key-padding mask is not supported")
    with pytest.raises(RuntimeError, match="cuda.*a sliding window is not supported"):
        fused_attn.scaled_dot_product_attention(q, k, v, window=(2, 0), backend="cuda")


def test_keys_outside_the_window_never_reach_the_output():
    """NaN and inf in k and v at keys no query of a batch entry sees (padding, outside the window)
    change nothing under a padding mask for k: those scores are never taken. (NaN in v at unseen
    keys follows torch's dense P @ V, as for causal masks: see test_cpu_numerics.)"""
    q, k, v = make_inputs(2, 2, 2, 40, 600, 16, 16, torch.float32)
    mask = _padding_mask([(0, 300), (520, 600)], 600)
    ref = fused_attn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    k_bad = k.clone()
    k_bad[0, :, 300:] = float("nan")
    k_bad[1, :, :520] = float("inf")
    out = fused_attn.scaled_dot_product_attention(q, k_bad, v, mask, backend="cpu")
    assert torch.equal(out, ref)


def test_window_gradients_with_torch_autograd_check():
    """fp64 gradcheck through the CPU kernels with a window and a padding mask together."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 1, 7, 11, 4, 3, torch.float64))
    mask = _padding_mask([(2, 10)], 11)
    f = lambda q, k, v: fused_attn.scaled_dot_product_attention(  # noqa: E731
        q, k, v, mask, enable_gqa=True, window=(3, 1), backend="cpu")
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("L,S,causal,expect", [
    (5, 9, False, CausalMode.LOWER_RIGHT),
    (5, 9, True, CausalMode.UPPER_LEFT),  # upper-left is the stricter one where L <= S
    (9, 5, True, CausalMode.LOWER_RIGHT),
    (7, 7, False, CausalMode.LOWER_RIGHT),
])
def test_window_minus1_0_is_lower_right_causal(L, S, causal, expect):
    """window (-1, 0) is FlashAttention's causal: it becomes the causal mode (every kernel runs it,
    the CUDA kernels too), intersected with is_causal."""
    q, k, v = make_inputs(1, 2, 2, L, S, 8, 8, torch.float32)
    p = make_problem(q, k, v, is_causal=causal, window=(-1, 0))
    assert p.spec.causal is expect and not p.spec.windowed
    check_backend("cpu", q, k, v, expect)
    got = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, window=(-1, 0), backend="cpu")
    torch.testing.assert_close(got, fused_attn.scaled_dot_product_attention(
        q, k, v, is_causal=causal, window=(-1, 0), backend="reference"))


def _no_fallback():
    """Fails the test if the dispatcher falls back to the reference (it warns then)."""
    import warnings
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=".*running naive PyTorch attention.*")
    return ctx


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_multihead_attention_key_padding_runs_in_the_kernels(monkeypatch, float_mask):
    """nn.MultiheadAttention with a key_padding_mask, alone and with is_causal: the kernels run it as
    key bounds (no fallback), and the output is torch's."""
    from fused_attn import dispatch
    from fused_attn.nn import MultiheadAttention
    monkeypatch.setattr(dispatch, "_said", set())
    N, L, E, H = 3, 11, 32, 4
    ours = MultiheadAttention(E, H, batch_first=True)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(N, L, E)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, 8:] = True
    pad[2, :3] = True  # left padding
    kpm = torch.zeros(N, L).masked_fill(pad, float("-inf")) if float_mask else pad
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    for kw in (dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, attn_mask=causal, is_causal=True)):
        ctx = _no_fallback()
        try:
            got, _ = ours(x, x, x, need_weights=False, **kw)
        finally:
            ctx.__exit__(None, None, None)
        want, _ = theirs(x, x, x, need_weights=False, **kw)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_models_with_padding_run_in_the_kernels():
    """BERT with a padding mask and a causal model with one: key bounds in the kernels, the same
    output as the reference backend's (which builds the masks)."""
    from fused_attn import models
    cfg = dict(vocab_size=50, d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, max_len=40,
               dropout=0.0)
    idx = torch.randint(0, 50, (3, 17))
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[0, 12:] = True
    pad[1, 16:] = True
    bert = models.BERT(models.TransformerConfig(**cfg)).eval()
    ref = models.BERT(models.TransformerConfig(backend="reference", **cfg)).eval()
    ref.load_state_dict(bert.state_dict())
    ctx = _no_fallback()
    try:
        got = bert(idx, pad)
    finally:
        ctx.__exit__(None, None, None)
    torch.testing.assert_close(got, ref(idx, pad), atol=1e-5, rtol=1e-5)


# ---- mask tensors (bool and additive float) in the CPU kernels ----------------------------------

def _mask_case(name, L, S, dtype):
    """The mask of case ``name`` for inputs (B, HQ, L, S) of ``dtype``, and its causal mode and window."""
    g = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    if name in ("bool_random", "bool_random_1023"):
        return rand(B, 1, L, S) > 0.3, CausalMode.NONE, (-1, -1)
    if name == "bool_tiles_hidden_and_whole":  # CPU key blocks of 512 (forward), 128 (backward)
        m = rand(B, 1, L, S) > 0.2
        m[..., 512:1024] = False  # whole tiles hidden: skipped
        m[0, :, :200, :512] = True  # whole tiles admitted: the unmasked path
        return m, CausalMode.NONE, (-1, -1)
    if name == "bool_rows_hidden":
        m = rand(B, HQ, L, S) > 0.5
        m[:, :, 3:40] = False
        return m, CausalMode.UPPER_LEFT, (-1, -1)
    if name == "float32_per_head":
        bias = torch.randn(B, HQ, L, S, generator=g)
        return bias.masked_fill(rand(B, HQ, L, S) > 0.8, float("-inf")), CausalMode.NONE, (-1, -1)
    if name == "float_inputs_dtype_broadcast":  # (L, S) in the inputs' dtype, broadcast over B and H
        return (3 * torch.randn(L, S, generator=g)).to(dtype), CausalMode.NONE, (-1, -1)
    if name == "float_with_window":
        return torch.randn(1, HQ, L, S, generator=g), CausalMode.NONE, (40, 3)
    if name == "bool_per_query_column_stride_0":  # (B, 1, L, 1): one value per query row
        m = rand(B, 1, L, 1) > 0.3
        return m, CausalMode.UPPER_LEFT, (-1, -1)
    raise ValueError(name)


MASK_CASES = {  # id -> (L, S)
    "bool_random": (113, 203),
    "bool_tiles_hidden_and_whole": (600, 1100),
    "bool_rows_hidden": (113, 203),
    "float32_per_head": (97, 203),
    "float_inputs_dtype_broadcast": (203, 97),
    "float_with_window": (113, 700),
    "bool_per_query_column_stride_0": (64, 64),
    "bool_random_1023": (1023, 1023),
}


@pytest.mark.parametrize("backend,dtype,case", _grid(MASK_CASES, [r for r in RUNS if r.values[0] == "cpu"]))
def test_mask_tensors_run_in_the_cpu_kernels(backend, dtype, case):
    L, S = MASK_CASES[case]
    mask, mode, window = _mask_case(case, L, S, dtype)
    q, k, v = make_inputs(B, HQ, HK, L, S, 32, 24, dtype)
    p = make_problem(q, k, v, mask, is_causal=mode is CausalMode.UPPER_LEFT, enable_gqa=True, window=window)
    assert p.mask is not None and fused_attn.explain_dispatch(q, k, v, mask, enable_gqa=True, window=window)["cpu"] is None
    check_backend("cpu", q, k, v, mode, with_lse_grad=True, window=window, attn_mask=mask)


def test_a_mask_is_read_where_it_is_stored():
    """An (L, S) mask broadcast over B x H: nothing of the expanded size is allocated."""
    from fused_attn.testing import peak_memory_bytes
    L = S = 512
    q, k, v = make_inputs(4, 8, 8, L, S, 32, 32, torch.float32)
    mask = torch.rand(L, S) > 0.3
    masked = peak_memory_bytes(lambda: fused_attn.scaled_dot_product_attention(q, k, v, mask, backend="cpu"))
    plain = peak_memory_bytes(lambda: fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu"))
    # the expanded bool mask would be 4 * 8 * L * S = 8 MiB; the mask itself is 256 KiB
    assert masked - plain < 64 * 1024, (masked, plain)


def test_nan_v_at_hidden_keys_follows_the_dense_product():
    """A NaN in v at a key the mask hides from a row makes that row's output NaN in the columns of
    the NaN, as torch's math path (P = 0 times NaN) and the reference give, whether the key's tile is
    skipped (hidden from every row of the tile) or masked in part."""
    q, k, v = make_inputs(1, 2, 2, 40, 1100, 16, 16, torch.float32)
    mask = torch.ones(1, 1, 40, 1100, dtype=torch.bool)
    mask[..., 512:1024] = False  # a whole tile hidden from every row: skipped
    mask[..., 7] = False  # one key hidden from every row inside a tile they see otherwise: masked
    v = v.clone()
    v[0, :, 600, 3] = float("nan")
    v[0, :, 7, 9] = float("nan")
    got = fused_attn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    want = fused_attn.scaled_dot_product_attention(q, k, v, mask, backend="reference")
    assert torch.equal(got.isnan(), want.isnan())
    assert got.isnan()[0, :, :, [3, 9]].all() and not got.isnan()[0, :, :, [0, 1, 2, 4, 5, 6, 7, 8]].any()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16),
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(MASK_GRAD_CASES))
def test_float_mask_gradient_in_the_cpu_kernels(case, dtype):
    check_mask_gradient("cpu", case, dtype)


def test_mask_gradient_follows_torch_and_skipped_tiles_are_zero():
    q, k, v = make_inputs(1, 2, 2, 130, 200, 16, 16, torch.float32)
    mask = torch.randn(130, 200, requires_grad=True)
    fused_attn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, backend="cpu").sum().backward()
    ref_mask = mask.detach().clone().requires_grad_()
    causal = torch.ones(130, 200, dtype=torch.bool).tril()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, ref_mask.masked_fill(~causal, float("-inf"))
                                                     ).sum().backward()
    torch.testing.assert_close(mask.grad, ref_mask.grad)
    assert (mask.grad[~causal] == 0).all() and (mask.grad[causal] != 0).any()
    why = fused_attn.explain_dispatch(q, k, v, torch.randn(130, 200), scale=1e-31)
    assert why["cpu"] == "a float attn_mask with |scale| < 1e-30 is not supported, got scale = 1e-31"


# ---- ALiBi (FlashAttention-2's: -slope * |i + S - L - j| added after the scale) -----------------

ALIBI_CASES = {  # id -> (L, S, causal mode, window, padding runs or mask, per-batch slopes)
    "heads": (113, 203, CausalMode.NONE, (-1, -1), None, False),
    "per_batch_causal_lower_right": (97, 203, CausalMode.LOWER_RIGHT, (-1, -1), None, True),
    "upper_left_L_gt_S": (203, 97, CausalMode.UPPER_LEFT, (-1, -1), None, False),
    "window_across_blocks": (600, 700, CausalMode.NONE, (130, 7), None, False),
    "key_padding": (113, 700, CausalMode.NONE, (-1, -1), [(0, 640), (300, 700)], True),
    "bool_mask": (113, 203, CausalMode.NONE, (-1, -1), "bool", False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(ALIBI_CASES))
def test_alibi_in_the_cpu_kernels(case, dtype):
    L, S, mode, window, masking, per_batch = ALIBI_CASES[case]
    q, k, v = make_inputs(B, HQ, HK, L, S, 32, 24, dtype)
    g = torch.Generator().manual_seed(11)
    slopes = torch.rand((B, HQ) if per_batch else (HQ,), generator=g) * 0.3
    mask = None
    if masking == "bool":
        mask = torch.rand(B, 1, L, S, generator=g) > 0.3
    elif masking is not None:
        mask = _padding_mask(masking, S)
    p = make_problem(q, k, v, mask, is_causal=mode is CausalMode.UPPER_LEFT, enable_gqa=True, window=window,
                     alibi_slopes=slopes)
    assert "alibi" in p.features() and p.alibi_slopes.shape == (B, HQ)
    check_backend("cpu", q, k, v, mode, with_lse_grad=True, window=window, attn_mask=mask, alibi_slopes=slopes)


def test_alibi_moves_the_output_and_matches_torch_with_the_bias_as_a_mask():
    """The same call through torch SDPA with ALiBi written out as an additive float mask."""
    q, k, v = make_inputs(2, 4, 4, 9, 13, 16, 16, torch.float64)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    i, j = torch.arange(9)[:, None] + 13 - 9, torch.arange(13)[None, :]
    bias = -slopes[:, None, None].double() * (i - j).abs()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = fused_attn.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes, backend="cpu")
    torch.testing.assert_close(got, want)
    assert (got - fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")).abs().max() > 1e-2


@pytest.mark.parametrize("slopes,error,match", [
    (torch.ones(3), ValueError, r"alibi_slopes of shape \(3\) does not broadcast to \(2, 4\)"),
    (torch.ones(4, dtype=torch.float64), TypeError, "alibi_slopes must be a float32 tensor"),
    ([0.5] * 4, TypeError, "alibi_slopes must be a float32 tensor"),
])
def test_bad_alibi_slopes_say_what_was_passed(slopes, error, match):
    q, k, v = make_inputs(2, 4, 4, 5, 5, 8, 8, torch.float32)
    with pytest.raises(error, match=match):
        fused_attn.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["heads", "per_sequence"])
def test_varlen_alibi_in_the_cpu_kernels(per_sequence):
    """varlen_attention with ALiBi: each sequence's own S - L and (per_sequence) its own slopes, against
    scaled_dot_product_attention on each sequence alone (fp64)."""
    lengths = [(5, 9), (0, 3), (40, 40), (17, 1)]
    g = torch.Generator().manual_seed(12)
    q = torch.randn(sum(a for a, _ in lengths), 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(b for _, b in lengths), 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist())  # noqa: E731
    cu_q, cu_k = cu([a for a, _ in lengths]), cu([b for _, b in lengths])
    slopes = torch.rand((len(lengths), 4) if per_sequence else (4,), generator=g)
    out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, causal=True, alibi_slopes=slopes, backend="cpu")
    for s, (a, b) in enumerate(lengths):
        if a == 0:
            continue
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        alone = fused_attn.scaled_dot_product_attention(
            q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1), enable_gqa=True, window=(-1, 0),
            alibi_slopes=slopes[s] if per_sequence else slopes, backend="reference")
        torch.testing.assert_close(out[qs], alone.transpose(0, 1))


# ---- logit soft-capping (FlashAttention-2's: softcap * tanh(x / softcap), x = scale q.k) ---------

SOFTCAP_CASES = {  # id -> (L, S, causal mode, window, softcap, with ALiBi, padding runs)
    "cap5": (113, 203, CausalMode.NONE, (-1, -1), 5.0, False, None),
    "cap2_causal_alibi": (203, 203, CausalMode.UPPER_LEFT, (-1, -1), 2.0, True, None),
    "cap10_window_padding": (113, 700, CausalMode.NONE, (40, 3), 10.0, False, [(0, 640), (300, 700)]),
    "cap30_lower_right_across_blocks": (600, 700, CausalMode.LOWER_RIGHT, (-1, -1), 30.0, False, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_softcap_in_the_cpu_kernels(case, dtype):
    """Scores large enough for the cap to matter (q ~ N(0, 3^2)), forward, lse and gradients."""
    L, S, mode, window, cap, alibi, runs = SOFTCAP_CASES[case]
    q, k, v = make_inputs(B, HQ, HK, L, S, 32, 24, dtype)
    q = (3 * q.double()).to(dtype)
    slopes = torch.full((HQ,), 0.05) if alibi else None
    mask = None if runs is None else _padding_mask(runs, S)
    assert "softcap" in make_problem(q, k, v, mask, enable_gqa=True, window=window, softcap=cap).features()
    check_backend("cpu", q, k, v, mode, with_lse_grad=True, window=window, attn_mask=mask, alibi_slopes=slopes,
                  softcap=cap)


def test_softcap_caps_and_matches_torch_on_capped_scores():
    q, k, v = make_inputs(1, 2, 2, 7, 9, 8, 8, torch.float64)
    q = 10 * q
    scores = softcapped = 4.0 * torch.tanh(q @ k.transpose(-2, -1) / 8 ** 0.5 / 4.0)
    want = torch.softmax(softcapped, dim=-1) @ v
    got = fused_attn.scaled_dot_product_attention(q, k, v, softcap=4.0, backend="cpu")
    torch.testing.assert_close(got, want)
    assert scores.abs().max() < 4.0 and (got - fused_attn.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan"), "3", True])
def test_bad_softcap_is_refused(softcap):
    q, k, v = make_inputs(1, 2, 2, 4, 4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        fused_attn.scaled_dot_product_attention(q, k, v, softcap=softcap)
