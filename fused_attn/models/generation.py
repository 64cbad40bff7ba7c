"""Decoding for the models in :mod:`fused_attn.models.model`: greedy, sampling, beam search.

Each function takes a model with ``init_cache(src) -> KVCache`` and
``decode_step(tokens (B, L), cache) -> logits (B, L, V)`` (``EncoderDecoder``, or
``GPT`` with ``src=None``) and a ``prefix`` (B, T0) of tokens to start from (a BOS
column for an encoder-decoder, the prompt for GPT). Every step feeds only the new
token through the model; the KV cache holds the rest. Returns the generated tokens
after the prefix, (B, T) with T <= ``max_new_tokens``; a row ends with its ``eos_id``
and is filled with ``pad_id`` after it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


@torch.no_grad()
def _decode(model, src: Optional[Tensor], prefix: Tensor, max_new_tokens: int, eos_id: Optional[int],
            pad_id: int, pick) -> Tensor:
    cache = model.init_cache(src)
    logits = model.decode_step(prefix, cache)[:, -1]  # (B, V)
    done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    out = []
    for step in range(max_new_tokens):
        token = pick(logits.float())  # (B,)
        token = token.masked_fill(done, pad_id)
        out.append(token)
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode_step(token[:, None], cache)[:, -1]
    return torch.stack(out, dim=1) if out else prefix.new_zeros(prefix.shape[0], 0)


def greedy_search(model, src: Optional[Tensor], prefix: Tensor, max_new_tokens: int,
                  eos_id: Optional[int] = None, pad_id: int = 0) -> Tensor:
    """The most likely next token at every step."""
    return _decode(model, src, prefix, max_new_tokens, eos_id, pad_id, lambda logits: logits.argmax(dim=-1))


def sample(model, src: Optional[Tensor], prefix: Tensor, max_new_tokens: int, eos_id: Optional[int] = None,
           pad_id: int = 0, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens
    and to the smallest set whose probability reaches ``top_p`` (nucleus), when given."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy_search for 0), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def pick(logits: Tensor) -> Tensor:
        return torch.multinomial(filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1), 1,
                                 generator=generator)[:, 0]

    return _decode(model, src, prefix, max_new_tokens, eos_id, pad_id, pick)


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """logits (B, V) with every token outside the top-k / top-p set at -inf (the most likely always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens more likely than it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def beam_search(model, src: Optional[Tensor], prefix: Tensor, max_new_tokens: int, eos_id: int,
                pad_id: int = 0, num_beams: int = 4, length_penalty: float = 1.0,
                early_stopping: bool = False) -> Tuple[Tensor, Tensor]:
    """Keep the ``num_beams`` best partial outputs per example; return the best finished one.

    A hypothesis of n tokens (EOS included) scores ``sum(log p) / n ** length_penalty``
    (> 0 favours longer outputs, 0 is the plain sum). A hypothesis is finished at EOS or at
    ``max_new_tokens``. An example stops once it has ``num_beams`` finished hypotheses and
    no live beam scores better than the worst of them (a heuristic: a live beam's score may
    still change); with ``early_stopping`` as soon as it has ``num_beams`` finished ones
    (faster, can miss longer, better outputs). With ``num_beams=1`` this is greedy search.
    Returns ``(tokens (B, T), scores (B,))``.
    """
    B, K = prefix.shape[0], num_beams
    device = prefix.device
    cache = model.init_cache(None if src is None else src.repeat_interleave(K, dim=0))
    logits = model.decode_step(prefix.repeat_interleave(K, dim=0), cache)[:, -1]  # (B*K, V)
    V = logits.shape[-1]
    # Only beam 0 of each example is live at first, so the K beams do not start as copies.
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    tokens = prefix.new_zeros(B * K, 0)
    finished: List[List[Tuple[float, Tensor]]] = [[] for _ in range(B)]
    done = [False] * B

    def score(total: float, n: int) -> float:
        return total / n ** length_penalty

    for step in range(max_new_tokens):
        n = step + 1
        logprobs = logits.float().log_softmax(dim=-1).view(B, K, V) + beam_scores[:, :, None]  # (B, K, V)
        top, idx = logprobs.view(B, K * V).topk(2 * K, dim=-1)  # enough that K continue past EOS picks
        src_beam, token = idx // V, idx % V  # (B, 2K)
        next_scores = torch.full((B, K), float("-inf"), device=device)
        next_beam = torch.zeros(B, K, dtype=torch.long, device=device)
        next_token = torch.full((B, K), pad_id, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:
                continue
            alive = 0
            for total, beam, tok in zip(top[b].tolist(), src_beam[b].tolist(), token[b].tolist()):
                if total == float("-inf"):
                    break
                if tok == eos_id or n == max_new_tokens:
                    hyp = torch.cat([tokens[b * K + beam], tokens.new_tensor([tok])])
                    finished[b].append((score(total, n), hyp))
                    if tok == eos_id:
                        continue
                if alive < K:
                    next_scores[b, alive], next_beam[b, alive], next_token[b, alive] = total, beam, tok
                    alive += 1
                if alive == K and (tok != eos_id or n == max_new_tokens):
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            if len(finished[b]) == K:
                if early_stopping:
                    done[b] = True
                else:
                    best_live = next_scores[b].max().item()
                    done[b] = best_live == float("-inf") or score(best_live, n) <= finished[b][-1][0]
        if all(done) or n == max_new_tokens:
            break
        rows = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[rows], next_token.view(-1, 1)], dim=1)
        beam_scores = next_scores
        cache.reorder(rows)
        logits = model.decode_step(next_token.view(-1, 1), cache)[:, -1]

    best = [max(f, key=lambda h: h[0]) for f in finished]
    T = max(h.numel() for _, h in best)
    out = prefix.new_full((B, T), pad_id)
    for b, (_, h) in enumerate(best):
        out[b, : h.numel()] = h
    return out, torch.tensor([s for s, _ in best], device=device)
