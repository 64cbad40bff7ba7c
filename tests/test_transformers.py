"""fused_attn.integrations.transformers: tiny random-init Hugging Face models, built from configs (nothing
downloaded), give the logits and greedy generate() tokens of attn_implementation="sdpa"; the fused CPU
kernel runs every call: with no mask tensor (causal LMs, chunked prefill, decoding, unpadded encoders),
with padding at one end of each sequence as key bounds, and with a materialised mask (a StaticCache
prefill, T5's position bias) as a mask tensor read tile by tile.

Tolerance: fused_attn.testing's rule on the model's output: fused_attn's fp32 result against the
same weights under "sdpa" in fp64 may err at most 2x as much as "sdpa" in fp32 does (plus the fp32
floor); measured ratios 0.4-0.95. Checks of fused_attn against itself (a left-padded row vs the
same tokens alone, chunked prefill vs one forward) use SELF_ATOL = 1e-5 of the outputs' scale: they
differ by fp32 rounding only (RoPE at shifted absolute positions, another summation order), measured
at most 1.3e-6 of it. The controls, where a mask is wrong or missing, move outputs by more than
WRONG = 1e-2 (measured 0.1 to 10).
"""
import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AttentionInterface, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,  # noqa: E402
                          BertConfig, DynamicCache, Gemma2Config, LlamaConfig, T5Config, T5PreTrainedModel)
from transformers.masking_utils import bidirectional_mask_function, sliding_window_causal_mask_function  # noqa: E402

import fused_attn.integrations.transformers as fa_hf  # noqa: E402
from fused_attn import dispatch  # noqa: E402
from fused_attn.testing import assert_close  # noqa: E402

SELF_ATOL = 1e-5
WRONG = 1e-2  # a control that must differ differs by at least this
V = 96


@pytest.fixture
def ran(monkeypatch):
    """The names of the backends dispatch chose, one per attention call."""
    names = []
    choose = dispatch.choose

    def spy(p, backend=None):
        chosen = choose(p, backend)
        names.append(chosen.name)
        return chosen

    monkeypatch.setattr(dispatch, "choose", spy)
    monkeypatch.setattr(dispatch, "LANES", False)  # every call through choose (dispatch.run_common)
    return names


def _same(a, b, what):
    """fused_attn against itself: equal up to fp32 rounding of the outputs' scale."""
    err = (a - b).abs().max().item()
    assert err <= SELF_ATOL * max(1.0, b.abs().max().item()), f"{what}: max difference {err:.3g}"


def _like_sdpa(run, ours, theirs, what):
    """``run(model)`` on fused_attn's model against "sdpa" in fp64, within 2x "sdpa" in fp32's error."""
    out = run(ours)
    assert_close(out, run(copy.deepcopy(theirs).double()), run(theirs), name=what)
    return out


def _pair(cls, cfg):
    """The same random weights with attn_implementation "fused_attn" (from_config) and "sdpa"."""
    ours = cls.from_config(copy.deepcopy(cfg), attn_implementation=fa_hf.register()).eval()
    theirs = cls.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    theirs.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "fused_attn" and theirs.config._attn_implementation == "sdpa"
    return ours, theirs


def _llama():
    """Llama-like causal LM: GQA (4 query heads on 2 kv heads), RoPE; weights 10x the default init so
    that logits spread (greedy decoding has no near-ties) and a wrong mask shows."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _pair(AutoModelForCausalLM, cfg)


def _cache_kwarg(model):
    """The forward argument for a KV cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_padded(batch=3, length=12):
    ids = torch.randint(3, V, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate((4, 0, 7)[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@torch.no_grad()
def test_llama_gqa_unpadded_runs_the_fused_cpu_kernel(ran):
    ours, theirs = _llama()
    ids = torch.randint(3, V, (2, 13))
    _like_sdpa(lambda m: m(ids).logits, ours, theirs, "Llama GQA, no mask")
    assert ran and set(ran) == {"cpu"}, ran  # causal, no mask tensor: the fused kernel, every layer
    ran.clear()
    _like_sdpa(lambda m: m(ids, attention_mask=torch.ones_like(ids)).logits, ours, theirs, "Llama GQA, all-ones mask")
    assert ran and set(ran) == {"cpu"}, ran  # an all-ones padding mask is no mask


@torch.no_grad()
def test_llama_left_padded_batch_runs_the_fused_kernel_with_key_bounds(ran):
    ours, theirs = _llama()
    ids, mask = _left_padded()
    logits = _like_sdpa(lambda m: m(ids, attention_mask=mask).logits, ours, theirs, "Llama GQA, left-padded")
    assert ran and set(ran) == {"cpu"}, ran  # the padding mask (B, 1, 1, S) as key bounds, with is_causal
    # RoPE is relative, so a left-padded row equals the same tokens alone, unpadded (fused kernel)
    alone = ours(ids[:1, 4:]).logits
    _same(logits[:1, 4:], alone, "left-padded row vs the row alone")
    assert ran[-1] == "cpu"


@torch.no_grad()
def test_llama_attention_function_alone_ignores_padding(monkeypatch):
    """The control for the mask function: registered without it, transformers builds no mask at all."""
    ours, theirs = _llama()
    monkeypatch.setitem(AttentionInterface._global_mapping, "fused_attn_no_mask_fn", fa_hf.attention_forward)
    ours.set_attn_implementation("fused_attn_no_mask_fn")
    ids, mask = _left_padded()
    err = (ours(ids, attention_mask=mask).logits - theirs(ids, attention_mask=mask).logits)[mask.bool()].abs().max()
    assert err > WRONG, f"padding ignored, yet the logits of real tokens moved by only {err:.3g}"


@torch.no_grad()
def test_llama_chunked_prefill_onto_a_cache_runs_the_fused_kernel_lower_right(ran):
    ours, theirs = _llama()
    ids = torch.randint(3, V, (2, 15))

    def chunked(model):  # prefill 6 + 5 + 3 tokens onto one cache, then one decoding step
        cache = {_cache_kwarg(model): DynamicCache(config=model.config)}
        return torch.cat([model(ids[:, a:b], use_cache=True, **cache).logits
                          for a, b in ((0, 6), (6, 11), (11, 14), (14, 15))], dim=1)

    logits = _like_sdpa(chunked, ours, theirs, "Llama GQA, chunked prefill")
    assert ran and set(ran) == {"cpu"}, ran  # chunks after the first: causal_lower_right, no mask tensor
    full = ours(ids).logits
    _same(logits, full, "chunked prefill vs one forward")
    # the control: upper-left causal (what is_causal=True alone means) is wrong for a chunk after cached keys
    assert (_upper_left_chunk(ours, ids) - full[:, 6:11]).abs().max() > WRONG


def _upper_left_chunk(model, ids):
    """Logits of ids[:, 6:11] after a prefill of ids[:, :6], with every mask replaced by None and the
    attention run upper-left (``is_causal=True`` on L < S)."""
    cache = {_cache_kwarg(model): DynamicCache(config=model.config)}
    model(ids[:, :6], use_cache=True, **cache)

    def upper_left(module, q, k, v, mask, **kw):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=kw.get("scaling"),
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(AttentionInterface._global_mapping, "fused_attn", upper_left)
        return model(ids[:, 6:11], use_cache=True, **cache).logits


@pytest.mark.parametrize("case", ["unpadded", "left_padded", "static_cache"])
@torch.no_grad()
def test_llama_generate_gives_sdpas_tokens(ran, case):
    """Greedy decoding, every call on the fused kernel: a StaticCache's prefill (its empty slots after
    the queries) with transformers' mask tensor, its decoding steps with the empty slots as padding."""
    ours, theirs = _llama()
    ids, mask = _left_padded() if case == "left_padded" else (torch.randint(3, V, (3, 9)), None)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    if case == "static_cache":
        kw["cache_implementation"] = "static"
    tokens = ours.generate(ids, **kw)
    assert tokens.shape == (3, ids.shape[1] + 8)
    assert torch.equal(tokens, theirs.generate(ids, **kw))
    assert set(ran) == {"cpu"}, ran  # prefill and every step


@torch.no_grad()
def test_bert_padded_and_unpadded_batches_run_the_fused_kernel(ran):
    """BERT-like encoder switched with set_attn_implementation; right padding."""
    cfg = BertConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     max_position_embeddings=32, initializer_range=0.2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    theirs = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    ours = copy.deepcopy(theirs)
    ours.set_attn_implementation(fa_hf.register())
    assert ours.config._attn_implementation == "fused_attn"
    ids = torch.randint(3, V, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 9:] = 0
    out = _like_sdpa(lambda m: m(ids, attention_mask=mask).last_hidden_state, ours, theirs, "BERT, right-padded")
    assert ran and set(ran) == {"cpu"}, ran  # the padding as key bounds
    ran.clear()
    unpadded = _like_sdpa(lambda m: m(ids).last_hidden_state, ours, theirs, "BERT, unpadded")
    assert ran and set(ran) == {"cpu"}, ran  # bidirectional, no mask tensor
    assert (out - unpadded)[0, :6].abs().max() > WRONG  # the padding mask reached the attention


def _t5():
    """T5-like encoder-decoder: relative position bias in the first layer of each stack; weights 3x the
    default init, so that padding and the bias move the logits clearly."""
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   initializer_factor=3.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _pair(AutoModelForSeq2SeqLM, cfg)


@torch.no_grad()
def test_t5_relative_position_bias_and_padding_run_the_fused_kernel(ran):
    """Encoder-decoder whose relative position bias is an additive float mask: a mask tensor the CPU
    kernel reads tile by tile, throughout."""
    if not T5PreTrainedModel._supports_sdpa:
        pytest.skip(f"T5 runs through transformers' attention interface from 5.15 on, not {transformers.__version__}")
    ours, theirs = _t5()
    ids = torch.randint(2, V, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    dec = torch.randint(2, V, (2, 6))
    logits = _like_sdpa(lambda m: m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                        ours, theirs, "T5, padded encoder")
    assert ran and set(ran) == {"cpu"}, ran
    unpadded = ours(input_ids=ids, decoder_input_ids=dec).logits
    assert (logits - unpadded)[1].abs().max() > WRONG  # the encoder padding mask reached the attention
    _same(logits[0], unpadded[0], "T5, an unpadded row is untouched by another row's padding")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))


@torch.no_grad()
def test_gemma2_softcap_and_sliding_window_run_the_fused_kernel(ran):
    """Gemma 2: logit soft-capping (transformers passes softcap) in every layer, a sliding-window layer
    (transformers' mask tensor) and a full one; against "eager" (which soft-caps), under the tolerance rule."""
    cfg = Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.2,
                       attn_logit_softcapping=5.0, final_logit_softcapping=None, sliding_window=4, pad_token_id=0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=fa_hf.register()).eval()
    theirs = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(3, V, (2, 11))
    logits = ours(ids).logits
    assert ran and set(ran) == {"cpu"}, ran
    assert_close(logits, copy.deepcopy(theirs).double()(ids).logits, theirs(ids).logits, name="Gemma 2")
    cfg.attn_logit_softcapping = None  # the control: without the cap the logits move
    uncapped = AutoModelForCausalLM.from_config(cfg, attn_implementation=fa_hf.register()).eval()
    uncapped.load_state_dict(ours.state_dict())
    assert (uncapped(ids).logits - logits).abs().max() > WRONG


def test_mask_function_returns_none_exactly_where_the_fused_kernels_run():
    kw = dict(batch_size=2, allow_is_bidirectional_skip=True)
    no_pad, pad = torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool)
    pad[0, 0] = False
    assert fa_hf.attention_mask(q_length=8, kv_length=8, attention_mask=no_pad, **kw) is None  # prefill
    assert fa_hf.attention_mask(q_length=3, kv_length=8, q_offset=5, attention_mask=no_pad, **kw) is None  # chunk
    assert fa_hf.attention_mask(q_length=1, kv_length=8, q_offset=7, **kw) is None  # decoding
    assert fa_hf.attention_mask(q_length=5, kv_length=8, mask_function=bidirectional_mask_function, **kw) is None
    # padding: the padding alone, (B, 1, 1, S), aligned lower-right or bidirectional, or a StaticCache's
    # decoding step (every key after the query's position is padding)
    for case in (dict(q_length=8, kv_length=8, attention_mask=pad),
                 dict(q_length=3, kv_length=8, q_offset=5, attention_mask=pad),
                 dict(q_length=5, kv_length=8, mask_function=bidirectional_mask_function, attention_mask=pad),
                 dict(q_length=1, kv_length=8, q_offset=2, attention_mask=pad[:, :3])):
        m = fa_hf.attention_mask(**{**kw, **case})
        keys = torch.cat([case["attention_mask"], torch.zeros(2, 8 - case["attention_mask"].shape[1], dtype=torch.bool)], 1)
        assert m is not None and torch.equal(m, keys[:, None, None, :]), case
    # materialised: a StaticCache's prefill (queries at 0, empty keys beyond them); sliding window;
    # a caller that forbids the skip
    for case in (dict(q_length=3, kv_length=8, q_offset=0, attention_mask=no_pad[:, :3]),
                 dict(q_length=8, kv_length=8, mask_function=sliding_window_causal_mask_function(3)),
                 dict(q_length=8, kv_length=8, mask_function=bidirectional_mask_function,
                      allow_is_bidirectional_skip=False),
                 dict(q_length=8, kv_length=8, allow_is_causal_skip=False)):
        m = fa_hf.attention_mask(**{**kw, **case})
        assert m is not None and m.dtype == torch.bool and m.shape == (2, 1, case["q_length"], 8), case
    tail = fa_hf.attention_mask(q_length=3, kv_length=8, attention_mask=no_pad[:, :3], **kw)
    assert torch.equal(tail[0, 0], torch.ones(3, 8, dtype=torch.bool).tril() & (torch.arange(8) < 3))


def test_unsupported_features_raise_with_the_reason():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="sinks"):
        fa_hf.attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="paged caches"):
        fa_hf.attention_forward(torch.nn.Module(), q, q, q, None, cache=object())  # transformers 5.23's paged cache
    out, weights = fa_hf.attention_forward(torch.nn.Module(), q, q, q, None, cache=DynamicCache())  # already updated
    assert out.shape == (1, 3, 2, 8) and weights is None
