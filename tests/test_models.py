"""The reference Transformer: backends agree, KV-cache decoding equals a full forward, decoding rules."""
import copy
import math

import pytest
import torch

from fused_attn.models import BERT, GPT, EncoderDecoder, TransformerConfig, beam_search, greedy_search, sample
from fused_attn.models import model as model_module
from fused_attn.models.model import KV, KVCache
from fused_attn.models.generation import filter_logits
from fused_attn.testing import assert_close

V, BOS, EOS, PAD = 23, 1, 2, 0

VARIANTS = {
    "post_ln_sinusoidal_relu": {},
    "pre_ln_learned_gelu": {"norm_first": True, "positions": "learned", "activation": "gelu"},
    "untied_no_bias": {"tie_weights": False, "bias": False},
}


def _config(**kw):
    base = dict(vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=48,
                max_len=40, dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _randomize(model, scale=0.3):
    """Larger random weights than the init, so outputs differ clearly between tokens and positions."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _build(kind, cfg):
    return {"encdec": EncoderDecoder, "gpt": GPT, "bert": BERT}[kind](cfg)


def _logits(model, kind, src, tgt, src_padding):
    if kind == "encdec":
        return model(src, tgt, src_padding)
    if kind == "gpt":
        return model(tgt)
    return model(src, src_padding)


def _run_backend(model, kind, backend, dtype, src, tgt, src_padding):
    m = copy.deepcopy(model).to(dtype)
    for module in m.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    logits = _logits(m, kind, src, tgt, src_padding)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (logits * g.to(dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in m.named_parameters()}


def _check_backend(model, kind, backend, src_padding=None, B=2, S=9, T=7):
    src = torch.randint(3, V, (B, S))
    tgt = torch.randint(3, V, (B, T))
    ref = _run_backend(model, kind, "reference", torch.float64, src, tgt, src_padding)
    base = _run_backend(model, kind, "reference", torch.float32, src, tgt, src_padding)
    got = _run_backend(model, kind, backend, torch.float32, src, tgt, src_padding)
    assert_close(got[0], ref[0], base[0], "logits")
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        assert_close(got[1][name], ref[1][name], base[1][name], f"grad {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["encdec", "gpt", "bert"])
def test_automatic_backend_matches_reference(kind, variant):
    model = _randomize(_build(kind, _config(**VARIANTS[variant])))
    _check_backend(model, kind, None)


@pytest.mark.parametrize("kind", ["encdec", "bert"])
def test_padding_mask_matches_reference(kind):
    model = _randomize(_build(kind, _config()))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    _check_backend(model, kind, None, src_padding=padding)


def test_padding_mask_hides_padded_positions():
    model = _randomize(EncoderDecoder(_config()))
    src, tgt = torch.randint(3, V, (1, 6)), torch.randint(3, V, (1, 4))
    padding = torch.tensor([[False] * 4 + [True] * 2])
    other = src.clone()
    other[0, 4:] = torch.randint(3, V, (2,))
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt, padding), model(other, tgt, padding))
        torch.testing.assert_close(model(src, tgt, padding), model(src[:, :4], tgt))


@pytest.mark.parametrize("kind", ["encdec", "gpt"])
def test_triton_backend_matches_reference(kind):
    """The Triton kernels, run by Triton's interpreter on the CPU (slow: a tiny model)."""
    pytest.importorskip("fused_attn.ops.triton_attention")
    cfg = _config(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=16)
    _check_backend(_randomize(_build(kind, cfg)), kind, "triton", B=1, S=5, T=4)


@pytest.mark.parametrize("cache_kind", ["preallocated", "paged", "concatenated"])
@pytest.mark.parametrize("kind", ["encdec", "gpt"])
def test_kv_cache_decoding_equals_full_forward(kind, cache_kind, monkeypatch):
    """Prefix, single tokens and a 2-token chunk (lower-right causal, L < S) through the cache: a
    preallocated one or a paged one in blocks of 4 (every self-attention step through attention_with_kvcache,
    the paged one with its block table) or a concatenated one."""
    model = _randomize(_build(kind, _config(cache=cache_kind, cache_block_size=4)))
    calls = []
    real = model_module.attention_with_kvcache
    monkeypatch.setattr(model_module, "attention_with_kvcache", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    src, tgt = torch.randint(3, V, (3, 8)), torch.randint(3, V, (3, 9))
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[2, 5:] = True
    with torch.no_grad():
        if kind == "encdec":
            full = model(src, tgt, padding)
            cache = model.init_cache(src, padding)
        else:
            full = model(tgt)
            cache = model.init_cache()
        chunks = [(0, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9)]
        steps = [model.decode_step(tgt[:, a:b], cache) for a, b in chunks]
    assert cache.length == 9
    assert len(calls) == (0 if cache_kind == "concatenated" else 6 * 2)  # 6 steps x 2 decoder layers
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generation_same_through_every_cache():
    """greedy_search, beam_search (which reorders the cache) and sample give the same tokens with a preallocated
    cache, a paged one (blocks of 4: beams share blocks and copy a partly filled one) and a concatenated one,
    for the encoder-decoder and GPT."""
    for kind in ("encdec", "gpt"):
        results = []
        for cache in ("preallocated", "paged", "concatenated"):
            torch.manual_seed(1)
            model = _randomize(_build(kind, _config(cache=cache, cache_block_size=4, tie_weights=False)), scale=0.1)
            src, start = _src()
            if kind == "gpt":
                src, start = None, torch.randint(3, V, (6, 4), generator=torch.Generator().manual_seed(2))
            greedy = greedy_search(model, src, start, 12, eos_id=EOS, pad_id=PAD)
            beam = beam_search(model, src, start, 12, eos_id=EOS, pad_id=PAD, num_beams=3)
            sampled = sample(model, src, start, 12, eos_id=EOS, pad_id=PAD, top_k=5,
                             generator=torch.Generator().manual_seed(4))
            results.append((greedy, *beam, sampled))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_preallocated_cache_capacity():
    """The preallocated cache holds max_len positions; a step past them says so (the positions' own limit
    speaks first for the model, so the cache is driven directly here)."""
    kv = KV(capacity=4)
    kv.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="the KV cache holds 4 positions; 3 are used and 2 more do not fit"):
        kv.append(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    assert kv.length == 3 and kv.keys()[0].shape == (1, 2, 3, 8)
    with pytest.raises(ValueError, match="cache must be 'preallocated', 'paged' or 'concatenated'"):
        _config(cache="blocks")
    with pytest.raises(ValueError, match="cache_block_size must be an int >= 1"):
        _config(cache="paged", cache_block_size=0)


def test_paged_cache_reorder_shares_full_blocks():
    """Beam search's reorder of a paged cache: rows continuing one earlier row share its full blocks (same block
    ids, nothing copied), a shared partly filled block is copied once per extra row, later blocks are each row's
    own; the keys each row sees are the earlier row's (as a copying reorder gives)."""
    cache = KVCache(1, capacity=12, block_size=4)
    kv = cache.self_kv[0]
    k, v = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    kv.append(k, v)  # 6 positions: one full block and a partly filled one per row
    table = cache.self_kv[0].pages[0]
    before = [list(row) for row in table.rows]
    cache.reorder(torch.tensor([2, 2, 0]))
    rows = table.rows
    assert rows[0][0] == rows[1][0] == before[2][0] and rows[2][0] == before[0][0]  # full blocks shared
    assert rows[0][1] == before[2][1] and rows[1][1] not in (before[2][1],) and rows[2][1] == before[0][1]
    assert len({blk for row in rows for blk in row[1:]}) == 3 * 2  # partial and later blocks: each row's own
    keys, values = kv.keys()
    torch.testing.assert_close(keys, k[[2, 2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(values, v[[2, 2, 0]], rtol=0, atol=0)
    kv.append(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8))  # rows 0 and 1 write their own partial blocks
    assert bool((kv.keys()[0][:, :, 6] == 1).all()) and torch.equal(kv.keys()[0][:, :, :6], k[[2, 2, 0]])


def _decoding_model():
    """An untied random model whose greedy outputs have different lengths, some ending in EOS."""
    torch.manual_seed(1)
    model = _randomize(EncoderDecoder(_config(tie_weights=False)), scale=0.1)
    with torch.no_grad():  # EOS likely enough to end some rows early: align it with the last LayerNorm's bias
        bias = model.decoder.blocks[-1].ln_ffn.bias
        model.lm_head.weight[EOS] += 0.4 * bias / bias.norm()
    torch.manual_seed(0)
    return model


def _src(B=6, S=7):
    return torch.randint(3, V, (B, S)), torch.full((B, 1), BOS)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_width_one_is_greedy(early_stopping):
    model = _decoding_model()
    src, start = _src()
    greedy = greedy_search(model, src, start, 12, eos_id=EOS, pad_id=PAD)
    beam, _ = beam_search(model, src, start, 12, eos_id=EOS, pad_id=PAD, num_beams=1,
                          early_stopping=early_stopping, length_penalty=0.7)
    ended = (greedy == EOS).any(dim=1)
    assert ended.any() and not ended.all(), "the test needs rows that end at EOS and rows that hit max length"
    assert torch.equal(beam, greedy)


def _sequence_logprob(model, src, tokens):
    """Teacher-forced sum of log p over tokens up to and including the first EOS, and their count."""
    ids = tokens.tolist()
    n = ids.index(EOS) + 1 if EOS in ids else len(ids)
    tgt_in = torch.tensor([[BOS] + ids[: n - 1]])
    with torch.no_grad():
        logp = model(src[None], tgt_in).log_softmax(-1)[0, torch.arange(n), torch.tensor(ids[:n])]
    return logp.sum().item(), n


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_scores_and_beats_greedy(length_penalty):
    model = _decoding_model()
    src, start = _src()
    greedy = greedy_search(model, src, start, 12, eos_id=EOS, pad_id=PAD)
    beam, scores = beam_search(model, src, start, 12, eos_id=EOS, pad_id=PAD, num_beams=5,
                               length_penalty=length_penalty)
    for b in range(src.shape[0]):
        total, n = _sequence_logprob(model, src[b], beam[b])
        assert math.isclose(scores[b].item(), total / n ** length_penalty, rel_tol=1e-4, abs_tol=1e-5)
        g_total, g_n = _sequence_logprob(model, src[b], greedy[b])
        # not guaranteed in general, but on these short outputs 5 beams find at least greedy's score
        assert scores[b].item() >= g_total / g_n ** length_penalty - 1e-5


def test_batched_decoding_equals_one_at_a_time():
    model = _decoding_model()
    src, start = _src()
    greedy = greedy_search(model, src, start, 12, eos_id=EOS, pad_id=PAD)
    beam, _ = beam_search(model, src, start, 12, eos_id=EOS, pad_id=PAD, num_beams=3)
    for b in range(src.shape[0]):
        g = greedy_search(model, src[b:b + 1], start[b:b + 1], 12, eos_id=EOS, pad_id=PAD)[0]
        assert torch.equal(greedy[b, : g.numel()], g) and (greedy[b, g.numel():] == PAD).all()
        one, _ = beam_search(model, src[b:b + 1], start[b:b + 1], 12, eos_id=EOS, pad_id=PAD, num_beams=3)
        assert torch.equal(beam[b, : one.shape[1]], one[0]) and (beam[b, one.shape[1]:] == PAD).all()


def test_eos_and_max_length():
    model = _decoding_model()
    src, start = _src()
    out = greedy_search(model, src, start, 5, eos_id=None)
    assert out.shape == (6, 5)
    out = greedy_search(model, src, start, 12, eos_id=EOS, pad_id=PAD)
    for row in out.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])
    assert out.shape[1] <= 12


def test_gpt_generation_continues_a_prompt():
    torch.manual_seed(2)
    model = _randomize(GPT(_config(tie_weights=False)))
    prompt = torch.randint(3, V, (2, 5))
    out = greedy_search(model, None, prompt, 6)
    with torch.no_grad():  # the greedy continuation by full forwards, one token at a time
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 5:])


def test_sampling_rules():
    model = _decoding_model()
    src, start = _src()
    greedy = greedy_search(model, src, start, 10, eos_id=EOS, pad_id=PAD)
    top1 = sample(model, src, start, 10, eos_id=EOS, pad_id=PAD, top_k=1)
    assert torch.equal(top1, greedy)
    draws = [sample(model, src, start, 10, eos_id=EOS, pad_id=PAD, temperature=2.0,
                    generator=torch.Generator().manual_seed(s)) for s in range(2)]
    assert not torch.equal(draws[0], draws[1])
    again = sample(model, src, start, 10, eos_id=EOS, pad_id=PAD, temperature=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))  # the smallest set with probability >= 0.7
    assert kept.tolist() == [[True, False, True, False], [True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.85))
    assert kept[0].tolist() == [True, False, True, True]
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept[0].tolist() == [True, False, True, False]
    assert torch.isfinite(filter_logits(logits, top_k=1, top_p=0.01)).sum(dim=1).tolist()[0] == 1


def test_weight_tying_and_positions():
    cfg = _config()
    model = EncoderDecoder(cfg)
    assert model.lm_head.weight is model.decoder.tok_emb.weight
    untied = EncoderDecoder(_config(tie_weights=False))
    assert untied.lm_head.weight is not untied.decoder.tok_emb.weight
    with pytest.raises(ValueError, match="max_len"):
        GPT(cfg)(torch.zeros(1, cfg.max_len + 1, dtype=torch.long))
