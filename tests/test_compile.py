"""torch.compile and torch.export over fused_attn: no graph breaks, the backend chosen as in eager
(argument, use_backend, environment variable, automatic; first call of the process or not), static
and dynamic shapes, no needless recompiles, and results and gradients equal to eager.

Compiles are slow on 2 cores: tiny shapes, ``aot_eager`` (which traces the backward as inductor
does) for most checks and inductor for the fused CPU kernel's forward and backward.
"""
import warnings

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

import fused_attn
from fused_attn import dispatch, models
from fused_attn.nn import MultiheadAttention


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dynamo.reset()
    yield
    dynamo.reset()


class Recorder:
    """A torch.compile backend that keeps each graph Dynamo hands it and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self, i=-1):
        """The fused_attn ops graph ``i`` calls (inside autograd.Function bodies too)."""
        code = "\n".join(m.code for m in self.graphs[i].modules() if isinstance(m, torch.fx.GraphModule))
        return {op for op in ("cpu_fwd", "triton_fwd", "cuda_fwd") if f"fused_attn.{op}" in code}


def assert_no_graph_breaks(fn, *args):
    dynamo.reset()
    e = dynamo.explain(fn)(*args)
    assert e.graph_break_count == 0, [str(b.reason) for b in e.break_reasons]
    assert e.graph_count == 1
    dynamo.reset()


def leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def outputs_and_grads(fn, inputs, params=()):
    """fn's outputs and the gradients of a random projection of them w.r.t. inputs and params."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o for o in outs if o is not None)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if torch.isfinite(o).all())
    wrt = [t for t in (*inputs, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(loss, wrt)


def assert_compiled_matches_eager(fn, inputs, params=(), backend="aot_eager", dynamic=False, atol=1e-5, rtol=1e-5):
    """fullgraph compile of ``fn`` gives eager's outputs and gradients; returns the compiled function."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    got, got_grads = outputs_and_grads(compiled, inputs, params)
    want, want_grads = outputs_and_grads(fn, inputs, params)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_grads, want_grads, atol=atol, rtol=rtol)
    return compiled


# ---- the functional API ----

def sdpa_causal(backend):
    return lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                   backend=backend)


def lse_gqa(backend):
    return lambda q, k, v: fused_attn.attention_with_lse(q, k, v, enable_gqa=True, backend=backend)


@pytest.mark.parametrize("backend,dynamic", [("cpu", False), ("cpu", True), ("reference", False), (None, True)],
                         ids=["cpu-static", "cpu-dynamic", "reference-static", "auto-dynamic"])
def test_functional_api(backend, dynamic):
    q, k, v = leaves((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16))
    for make in (sdpa_causal, lse_gqa):
        fn = make(backend)
        assert_no_graph_breaks(fn, q, k, v)
        compiled = assert_compiled_matches_eager(fn, (q, k, v), dynamic=dynamic)
        if dynamic:  # another batch and lengths: no recompile, still equal
            q2, k2, v2 = leaves((3, 4, 12, 16), (3, 2, 5, 16), (3, 2, 5, 16))
            torch.testing.assert_close(compiled(q2, k2, v2), fn(q2, k2, v2), atol=1e-5, rtol=1e-5)


def test_inductor_forward_and_backward():
    """The fused CPU kernel under inductor, forward (out and lse) and gradients."""
    def fn(q, k, v):
        return fused_attn.attention_with_lse(q, k, v, is_causal=True, backend="cpu")
    q, k, v = leaves((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    assert_compiled_matches_eager(fn, (q, k, v), backend="inductor")


def test_no_recompile_for_new_values_and_recompile_for_new_shapes():
    rec = Recorder()
    compiled = torch.compile(sdpa_causal("cpu"), fullgraph=True, backend=rec)
    for _ in range(3):
        compiled(*leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    assert len(rec.graphs) == 1
    compiled(*leaves((1, 2, 11, 16), (1, 2, 11, 16), (1, 2, 11, 16)))  # new L: one (dynamic) recompile
    compiled(*leaves((1, 2, 13, 16), (1, 2, 13, 16), (1, 2, 13, 16)))
    assert len(rec.graphs) == 2


def test_use_backend_is_guarded():
    """The use_backend context around a compiled function picks the graph; switching back reuses it."""
    rec = Recorder()
    compiled = torch.compile(sdpa_causal(None), fullgraph=True, backend=rec)
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    with fused_attn.use_backend("reference"):
        want = compiled(q, k, v)
    assert len(rec.graphs) == 1 and rec.ops() == set()
    with fused_attn.use_backend("cpu"):
        got = compiled(q, k, v)
    assert len(rec.graphs) == 2 and rec.ops() == {"cpu_fwd"}
    with fused_attn.use_backend("reference"):
        compiled(q, k, v)
    assert len(rec.graphs) == 2
    compiled(q, k, v)  # automatic (guarded on the context read, None): the cpu kernels
    assert len(rec.graphs) == 3 and rec.ops() == {"cpu_fwd"}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_use_backend_inside_compiled_function():
    def fn(q, k, v):
        with fused_attn.use_backend("reference"):
            return fused_attn.scaled_dot_product_attention(q, k, v)
    rec = Recorder()
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    assert_no_graph_breaks(fn, q, k, v)
    torch.compile(fn, fullgraph=True, backend=rec)(q, k, v)
    assert rec.ops() == set() and getattr(dispatch._context, "backend", None) is None
    with fused_attn.use_backend("cpu"):
        assert_compiled_matches_eager(fn, (q, k, v))


def test_environment_variable_is_read_when_compiling(monkeypatch):
    """FUSED_ATTN_BACKEND reaches a compiled function (read when it compiles: documented in dispatch)."""
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    rec = Recorder()
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    torch.compile(sdpa_causal(None), fullgraph=True, backend=rec)(q, k, v)
    assert rec.ops() == set()
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    dynamo.reset()
    torch.compile(sdpa_causal(None), fullgraph=True, backend=rec)(q, k, v)
    assert rec.ops() == {"cpu_fwd"}


def test_first_call_of_the_process_under_compile(monkeypatch):
    """Backend op modules not yet imported: the import happens while compiling, not as a graph break."""
    for b in dispatch.BACKENDS.values():
        if isinstance(b, dispatch.KernelBackend):
            monkeypatch.setattr(b, "_ops", None)
            monkeypatch.setattr(b, "_import_error", None)
    monkeypatch.setattr(dispatch.get("triton"), "module", "no_such_module")  # as if triton were missing
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    assert_no_graph_breaks(sdpa_causal(None), q, k, v)
    assert dispatch.get("cpu")._ops is not None
    assert "not available in this install" in fused_attn.explain_dispatch(q, k, v)["triton"]


def test_one_graph_for_repeated_calls(monkeypatch):
    """The dispatcher's caches do not make a compiled call site compile twice (Dynamo guards on the
    dicts it traces: a cache filled while tracing failed its guard on the next call)."""
    monkeypatch.setattr(dispatch, "_refusals", {})
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    rec = Recorder()
    compiled = torch.compile(lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v), fullgraph=True,
                             backend=rec)
    for _ in range(3):
        compiled(q, k, v)
    assert len(rec.graphs) == 1


def test_fallback_warning_under_compile(monkeypatch):
    """A head dim no kernel takes (300) under automatic choice falls back to the reference and says so
    once, no graph break."""
    monkeypatch.setattr(dispatch, "_said", set())
    q, k, v = leaves((1, 2, 8, 300), (1, 2, 8, 300), (1, 2, 8, 16))
    mask = torch.randn(8, 8)
    rec = Recorder()
    compiled = torch.compile(lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                             fullgraph=True, backend=rec)
    with pytest.warns(UserWarning, match="running naive PyTorch attention"):
        got = compiled(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_mask_gradient_and_dropout_under_compile(backend):
    """A float mask that requires grad, and dropout, run in the cpu kernels under torch.compile
    (no graph break) with the eager call's gradients (the dropout seed drawn in the graph)."""
    q, k, v = leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    mask = torch.randn(8, 8, requires_grad=True)

    def fn(q, k, v, mask, p):
        return fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = outputs_and_grads(lambda *a: compiled(*a, 0.0), (q, k, v, mask))
    want = outputs_and_grads(lambda *a: fn(*a, 0.0), (q, k, v, mask))
    torch.testing.assert_close(got, want)
    out = compiled(q, k, v, mask, 0.5)
    out.sum().backward()
    assert mask.grad is not None and out.ne(fn(q, k, v, mask, 0.0)).any()


# ---- nn.MultiheadAttention and the models ----

def test_multihead_attention():
    mha = MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    calls = {
        "need_weights": lambda x: mha(x, x, x),
        "causal": lambda x: mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False),
    }
    for name, fn in calls.items():
        assert_no_graph_breaks(fn, x)
        assert_compiled_matches_eager(fn, (x,), list(mha.parameters()))


def _config(**kw):
    return models.TransformerConfig(vocab_size=32, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                                    d_ff=64, max_len=32, dropout=0.0, **kw)


@pytest.mark.parametrize("name", ["GPT", "BERT", "EncoderDecoder"])
def test_models(name):
    """Every model, forward and parameter gradients; GPT also with dynamic shapes and cpu kernels by name."""
    idx = torch.randint(0, 32, (2, 9))
    if name == "GPT":
        model = models.GPT(_config(backend="cpu"))
        fn, args = model, (idx,)
    elif name == "BERT":
        model = models.BERT(_config())
        pad = torch.zeros(2, 9, dtype=torch.bool)
        pad[1, 6:] = True
        fn, args = model, (idx, pad)
    else:
        model = models.EncoderDecoder(_config())
        fn, args = model, (idx, idx[:, :5])
    assert_no_graph_breaks(fn, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's padding mask falls back to the reference
        compiled = assert_compiled_matches_eager(fn, args, list(model.parameters()), dynamic=name == "GPT")
    if name == "GPT":
        longer = torch.randint(0, 32, (3, 13))
        torch.testing.assert_close(compiled(longer), model(longer), atol=1e-5, rtol=1e-5)


def test_gpt_decoding_steps():
    """A prompt, a chunk of three tokens after it (lower-right causal: the window (-1, 0)), then a
    token, through the KV cache (causal flag, window, then no mask), no graph break."""
    model = models.GPT(_config(backend="cpu")).eval()

    def decode(prompt, chunk, tokens):
        cache = model.init_cache()
        logits = [model.decode_step(prompt, cache), model.decode_step(chunk, cache)]
        for i in range(tokens.shape[1]):
            logits.append(model.decode_step(tokens[:, i:i + 1], cache))
        return torch.cat(logits, dim=1)

    prompt, chunk, tokens = torch.randint(0, 32, (2, 5)), torch.randint(0, 32, (2, 3)), torch.randint(0, 32, (2, 1))
    assert_no_graph_breaks(decode, prompt, chunk, tokens)
    got = torch.compile(decode, fullgraph=True, backend=Recorder())(prompt, chunk, tokens)
    torch.testing.assert_close(got, decode(prompt, chunk, tokens))
    torch.testing.assert_close(got, model(torch.cat([prompt, chunk, tokens], dim=1)), atol=1e-5, rtol=1e-5)


# ---- torch.export ----

class Attention(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v):
        return fused_attn.attention_with_lse(q, k, v, is_causal=True, enable_gqa=True, backend=self.backend)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_export(backend, strict):
    q, k, v = (torch.randn(2, 4, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    B, L, S = torch.export.Dim("B"), torch.export.Dim("L"), torch.export.Dim("S")
    ep = torch.export.export(Attention(backend), (q, k, v), strict=strict,
                             dynamic_shapes=({0: B, 2: L}, {0: B, 2: S}, {0: B, 2: S}))
    assert ("fused_attn.cpu_fwd" in ep.graph_module.code) == (backend != "reference")
    for shapes in [((2, 4, 7, 16), (2, 2, 9, 16)), ((3, 4, 12, 16), (3, 2, 5, 16))]:
        q, k, v = torch.randn(shapes[0]), torch.randn(shapes[1]), torch.randn(shapes[1])
        torch.testing.assert_close(ep.module()(q, k, v), Attention(backend)(q, k, v))


def test_export_gradients_reference():
    q, k, v = leaves((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16))
    ep = torch.export.export(Attention("reference"), (q, k, v))
    got, want = outputs_and_grads(ep.module(), (q, k, v)), outputs_and_grads(Attention("reference"), (q, k, v))
    torch.testing.assert_close(got, want)


def test_export_gradients_kernel():
    """An exported program holds the kernels' raw ops, which are differentiable (register_autograd)."""
    q, k, v = leaves((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16))
    ep = torch.export.export(Attention("cpu"), (q, k, v))
    got, want = outputs_and_grads(ep.module(), (q, k, v)), outputs_and_grads(Attention("cpu"), (q, k, v))
    torch.testing.assert_close(got, want)


def test_export_multihead_attention_and_models():
    """torch.export (non-strict; strict measured to work too) of MultiheadAttention and every model."""
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)

    idx = torch.randint(0, 32, (2, 9))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    cases = [(SelfAttention(), (torch.randn(2, 7, 32),)), (models.GPT(_config()).eval(), (idx,)),
             (models.BERT(_config()).eval(), (idx, pad)), (models.EncoderDecoder(_config()).eval(), (idx, idx[:, :5]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's padding mask falls back to the reference
        for module, args in cases:
            torch.testing.assert_close(torch.export.export(module, args).module()(*args), module(*args))
