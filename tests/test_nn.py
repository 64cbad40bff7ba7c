"""fused_attn.nn.MultiheadAttention against torch.nn.MultiheadAttention.

Each case builds a torch module, loads its state_dict into ours with strict=True,
and checks outputs, attention weights and every gradient under the project's
tolerance rule: ours in fp32 against torch in fp64, no worse than 2x torch in fp32.
"""
import pytest
import torch

import fused_attn.nn as fnn
from fused_attn.testing import assert_close

E, H, N, L, S = 24, 3, 2, 7, 5

CONFIGS = {
    "packed": {},
    "kdim_vdim": {"kdim": 10, "vdim": 14},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_kdim": {"add_bias_kv": True, "add_zero_attn": True, "kdim": 10, "vdim": 14},
}


def _pair(cfg, batch_first):
    torch_mha = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64, **cfg)
    with torch.no_grad():  # non-zero biases, so a bias mix-up shows
        for p in torch_mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = fnn.MultiheadAttention(E, H, batch_first=batch_first, **cfg)
    ours.load_state_dict({k: v.float() for k, v in torch_mha.state_dict().items()}, strict=True)
    torch32 = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, **cfg)
    torch32.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), torch_mha.eval(), torch32.eval()


def _inputs(cfg, batched, batch_first, self_attn):
    kdim, vdim = cfg.get("kdim", E), cfg.get("vdim", E)

    def x(length, dim):
        if not batched:
            return torch.randn(length, dim, dtype=torch.float64)
        return torch.randn((N, length, dim) if batch_first else (length, N, dim), dtype=torch.float64)

    if self_attn:
        q = x(L, E)
        return q, q, q
    return x(L, E), x(S, kdim), x(S, vdim)


def _masks(kind, batched, Lk, extra=0):
    """MHA-convention masks (True = blocked) that leave every query at least one key."""
    n = N if batched else 1
    blocked = torch.rand(L, Lk) < 0.4
    blocked[:, 0] = False
    heads_blocked = torch.rand(n * H, L, Lk) < 0.4
    heads_blocked[:, :, -1] = False
    pad = torch.zeros(n, Lk, dtype=torch.bool)
    pad[0, Lk - 2:] = True
    pad = pad if batched else pad[0]
    float_mask = torch.randn(L, Lk, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    causal = torch.ones(L, Lk, dtype=torch.bool).triu(1)
    return {
        "none": (None, None, False),
        "bool_2d": (blocked, None, False),
        "float_2d": (float_mask, None, False),
        "bool_3d": (heads_blocked, None, False),
        "float_3d": (torch.randn(n * H, L, Lk, dtype=torch.float64), None, False),
        "padding_bool": (None, pad, False),
        "padding_float": (None, torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, float("-inf")), False),
        "bool_2d_and_padding": (blocked, pad, False),
        "causal_hint": (causal, None, True),
        "causal_hint_and_padding": (causal, pad, True),
    }[kind]


def _run(module, q, k, v, masks, dtype, **kw):
    attn_mask, kpm, is_causal = masks
    cast = (lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(dtype)))
    if q is k and k is v:  # self-attention with one tensor, as users call it
        q = k = v = q.detach().to(dtype).requires_grad_()
    else:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, w = module(q, k, v, key_padding_mask=cast(kpm), attn_mask=cast(attn_mask),
                    is_causal=is_causal, **kw)
    return out, w, (q, k, v)


def _check(ours, torch_mha, torch32, q, k, v, masks, **kw):
    results = []
    for module, dtype in ((ours, torch.float32), (torch_mha, torch.float64), (torch32, torch.float32)):
        module.zero_grad()
        out, w, inputs = _run(module, q, k, v, masks, dtype, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        loss = (out * g.to(dtype)).sum()
        if w is not None:
            gw = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            loss = loss + (w * gw.to(dtype)).sum()
        loss.backward()
        grads = {f"grad {n}": p.grad for n, p in module.named_parameters()}
        grads.update({f"grad {n}": t.grad for n, t in zip("qkv", inputs)})
        results.append(({"output": out, "weights": w}, grads))
    (o_ours, g_ours), (o_ref, g_ref), (o_base, g_base) = results
    assert (o_ours["weights"] is None) == (o_ref["weights"] is None)
    for name in ("output", "weights"):
        if o_ref[name] is not None:
            assert_close(o_ours[name].detach(), o_ref[name].detach(), o_base[name].detach(), name)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g_ours[name], g_ref[name], g_base[name], name)


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_state_dict_is_torchs(cfg):
    torch_mha = torch.nn.MultiheadAttention(E, H, **CONFIGS[cfg])
    ours = fnn.MultiheadAttention(E, H, **CONFIGS[cfg])
    assert list(ours.state_dict()) == list(torch_mha.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), torch_mha.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    assert isinstance(ours.out_proj, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
    torch_mha.load_state_dict(ours.state_dict(), strict=True)


MASK_KINDS = ["none", "bool_2d", "float_2d", "bool_3d", "float_3d", "padding_bool", "padding_float",
              "bool_2d_and_padding", "causal_hint", "causal_hint_and_padding"]


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_masks_parity(mask, batch_first):
    cfg = CONFIGS["packed"]
    ours, torch_mha, torch32 = _pair(cfg, batch_first)
    self_attn = mask.startswith("causal")
    q, k, v = _inputs(cfg, True, batch_first, self_attn)
    _check(ours, torch_mha, torch32, q, k, v, _masks(mask, True, L if self_attn else S))


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("mask", ["none", "bool_2d_and_padding", "float_3d"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_constructor_options_parity(cfg, mask, batched):
    ours, torch_mha, torch32 = _pair(CONFIGS[cfg], batch_first=True)
    q, k, v = _inputs(CONFIGS[cfg], batched, True, self_attn=False)
    attn_mask, kpm, _ = _masks(mask, batched, S)
    _check(ours, torch_mha, torch32, q, k, v, (attn_mask, kpm, False))


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_weights_options_parity(need_weights, average, batched):
    ours, torch_mha, torch32 = _pair(CONFIGS["packed"], batch_first=False)
    q, k, v = _inputs(CONFIGS["packed"], batched, False, self_attn=False)
    _check(ours, torch_mha, torch32, q, k, v, _masks("bool_3d", batched, S),
           need_weights=need_weights, average_attn_weights=average)


def test_self_attention_same_tensor_parity():
    ours, torch_mha, torch32 = _pair(CONFIGS["packed"], batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    _check(ours, torch_mha, torch32, x, x, x, _masks("none", True, L), need_weights=False)


def test_is_causal_without_mask_raises_like_torch():
    ours, torch_mha, _ = _pair(CONFIGS["packed"], batch_first=False)
    x = torch.randn(L, N, E)
    with pytest.raises(RuntimeError, match="attn_mask"):
        torch_mha(x.double(), x.double(), x.double(), is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True)


def test_bad_mask_shape_says_what_was_passed():
    ours = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        ours(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))


def _recording_sdpa(monkeypatch):
    calls = []
    real = fnn.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(fnn, "scaled_dot_product_attention", record)
    return calls


def test_fusable_cases_pass_no_mask_tensor(monkeypatch):
    """No mask, and the causal hint, reach the fused call as is_causal, not as a mask tensor."""
    calls = _recording_sdpa(monkeypatch)
    mha = fnn.MultiheadAttention(E, H).eval()
    x = torch.randn(L, N, E)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    mha(x, x, x)
    mha(x, x, x, attn_mask=causal, is_causal=True)
    mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    assert [(m is None, c) for m, c in calls] == [(True, False), (True, True), (True, True)]


def test_backend_argument_reaches_the_dispatcher():
    mha = fnn.MultiheadAttention(E, H, backend="no_such_backend")
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="no_such_backend"):
        mha(x, x, x)


def test_triton_backend_runs_mha():
    """The Triton kernels (interpreted on the CPU) serve the unmasked and causal cases."""
    pytest.importorskip("fused_attn.ops.triton_attention")
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = fnn.MultiheadAttention(16, 2, batch_first=True, backend="triton").eval()
    ours.load_state_dict(torch_mha.state_dict(), strict=True)
    x = torch.randn(1, 9, 16)
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    for mask, hint in ((None, False), (causal, True)):
        expected, _ = torch_mha(x, x, x, attn_mask=mask, need_weights=False)
        got, _ = ours(x, x, x, attn_mask=mask, is_causal=hint, need_weights=False)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_mode_without_dropout_parity():
    ours, torch_mha, torch32 = _pair(CONFIGS["bias_kv"], batch_first=False)
    for m in (ours, torch_mha, torch32):
        m.train()
    q, k, v = _inputs(CONFIGS["bias_kv"], True, False, self_attn=False)
    _check(ours, torch_mha, torch32, q, k, v, _masks("padding_bool", True, S))


def test_dropout_applies_in_training_only(monkeypatch):
    from fused_attn import dispatch
    chosen = []
    real_choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda p, backend=None, **kw: chosen.append(
        real := real_choose(p, backend, **kw)) or real)
    monkeypatch.setattr(dispatch, "LANES", False)  # every call through choose (dispatch.run_common)
    mha = fnn.MultiheadAttention(E, H, dropout=0.5)
    x = torch.randn(L, N, E)
    first, w = mha(x, x, x)
    assert [b.name for b in chosen] == ["cpu"]  # dropout in the kernels, not the reference
    second, _ = mha(x, x, x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(w.sum(-1), torch.ones(N, L))  # weights before dropout
    mha.eval()
    torch.testing.assert_close(mha(x, x, x)[0], mha(x, x, x)[0])
