"""Decoding against a KV cache: fused_attn.attention_with_kvcache against torch SDPA, same run (issue 15's
table).

    python benchmarks/decode.py --threads 2

Each row is one decoding step, one new token per sequence: q (B, 32, 1, 128), the new key and value
(B, 8, 1, 128) (GQA, Hq 32 / Hk 8), a cache of S keys after the step, for B in (1, 8), S in (1k, 8k, 32k),
float32 and bfloat16. Three sides, each doing the whole step (append, then attend):

- ``fused``: ``attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=S - 1)`` on a cache
  preallocated for S + 128 keys (the append is in place; the slots after the count are never read);
- ``torch concat``: ``torch.cat`` of the past S - 1 keys and values with the new ones, then
  ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (how a cache grows without this function);
- ``torch slice``: the new key and value copied into the same preallocated cache, then SDPA on the
  slice ``[:, :, :S]`` (torch's best without a fused cache call).

``--gpt`` adds end-to-end generation: tokens/s of ``fused_attn.models.GPT`` (4 layers, d_model 256, 4 heads of
64, fp32) generating ``--gpt-tokens`` (256) tokens greedily after a ``--gpt-prompt`` (1024) token prompt, batch
1: the model as built (automatic backend, preallocated cache, steps through attention_with_kvcache), the same
with a cache grown by concatenation, on the reference backend, and with torch SDPA in place of fused_attn's
(concatenated cache). Best of ``--gpt-rounds`` (3) runs each.

Speedups are torch's time over fused_attn's (best round of each; timing as benchmarks/per_call.py);
targets (issue 15): 1.5 over concat, 1.2 over slice. ``--heads 32/8 1/1`` adds rows with one head (one task per
sequence: the CPU splits its keys across threads, split-KV). ``--lengths`` picks the cache lengths (the smoke
test runs a short one). The table goes to the screen and, as markdown, to --out/decode.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_attn  # noqa: E402
from per_call import time_rounds, write_table  # noqa: E402

HQ, HK, E = 32, 8, 128
SPARE = 128  # preallocated slots past the step's keys
TARGETS = {"concat": 1.5, "slice": 1.2}


def sides(B: int, S: int, dtype: torch.dtype, Hq: int = HQ, Hk: int = HK) -> Dict[str, Callable[[], None]]:
    """One decoding step of each side on fresh random inputs (drawn once; caches filled with random keys)."""
    q = torch.randn(B, Hq, 1, E, dtype=dtype)
    k_new, v_new = (torch.randn(B, Hk, 1, E, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, Hk, S + SPARE, E, dtype=dtype) for _ in range(2))
    k_past, v_past = (c[:, :, :S - 1].clone() for c in (k_cache, v_cache))
    lengths = torch.full((B,), S - 1, dtype=torch.int32)

    def fused():
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths)

    def concat():
        k, v = torch.cat((k_past, k_new), 2), torch.cat((v_past, v_new), 2)
        F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hk)

    def slice_():
        k_cache[:, :, S - 1:S].copy_(k_new)
        v_cache[:, :, S - 1:S].copy_(v_new)
        F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], enable_gqa=Hq != Hk)
    return {"fused": fused, "concat": concat, "slice": slice_}


def run(lengths=(1024, 8192, 32768), batches=(1, 8), dtypes=(torch.float32, torch.bfloat16),
        rounds: int = 5, heads=((HQ, HK),)) -> List[dict]:
    """One row per (heads, dtype, B, S): each side's best time per step (us) and torch's over fused_attn's."""
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for Hq, Hk in heads:
            for dtype in dtypes:
                for B in batches:
                    for S in lengths:
                        n = max(1, 200_000 * HK // (B * S * Hk))  # calls per round: about the same time each
                        times = time_rounds(sides(B, S, dtype, Hq, Hk), n, rounds)
                        best = {side: min(ts) * 1e6 for side, ts in times.items()}
                        rows.append(dict(dtype=str(dtype).replace("torch.", ""), B=B, S=S, heads=f"{Hq}/{Hk}",
                                         **{f"{k}_us": v for k, v in best.items()},
                                         vs_concat=best["concat"] / best["fused"],
                                         vs_slice=best["slice"] / best["fused"]))
    return rows


GPT_CONFIG = dict(vocab_size=256, d_model=256, n_heads=4, n_encoder_layers=0, n_decoder_layers=4, d_ff=1024,
                  dropout=0.0)


def _torch_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                window=(-1, -1), backend=None, **_):
    """torch's SDPA with the models' arguments: their lower-right window (-1, 0) as causal_lower_right."""
    if window == (-1, 0):
        attn_mask = torch.nn.attention.bias.causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def run_gpt(prompt: int = 1024, tokens: int = 256, rounds: int = 3) -> List[dict]:
    """One row per side: seconds per generation (best round) and tokens/s, GPT_CONFIG in fp32, batch 1."""
    from fused_attn.models import GPT, TransformerConfig, greedy_search
    from fused_attn.models import model as model_module
    torch.manual_seed(0)
    idx = torch.randint(0, GPT_CONFIG["vocab_size"], (1, prompt))
    rows = []
    for side, cache, backend, sdpa in (("fused_attn (preallocated cache)", "preallocated", None, None),
                                       ("fused_attn (concatenated cache)", "concatenated", None, None),
                                       ("reference backend", "preallocated", "reference", None),
                                       ("torch SDPA (concatenated cache)", "concatenated", None, _torch_sdpa)):
        torch.manual_seed(1)
        model = GPT(TransformerConfig(**GPT_CONFIG, max_len=prompt + tokens, cache=cache, backend=backend)).eval()
        real = model_module.scaled_dot_product_attention
        if sdpa is not None:
            model_module.scaled_dot_product_attention = sdpa
        try:
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                out = greedy_search(model, None, idx, tokens)
                best = min(best, time.perf_counter() - t0)
        finally:
            model_module.scaled_dot_product_attention = real
        rows.append(dict(side=side, seconds=best, tokens_per_s=out.shape[1] / best, tokens=out[0, :8].tolist()))
    return rows


def gpt_markdown(rows: List[dict], prompt: int, tokens: int) -> str:
    lines = [f"| GPT, {prompt}-token prompt, {tokens} new tokens | seconds | tokens/s | vs torch SDPA |", "|---|---|---|---|"]
    torch_s = rows[-1]["seconds"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['seconds']:.4f} | {r['tokens_per_s']:.1f} | {torch_s / r['seconds']:.2f} |")
    return "\n".join(lines)


def markdown(rows: List[dict]) -> str:
    lines = ["| dtype | B | S | fused us | torch concat us | torch slice us | speedup vs concat (target 1.5) "
             "| speedup vs slice (target 1.2) | Hq/Hk |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['B']} | {r['S']} | {r['fused_us']:.1f} | {r['concat_us']:.1f} | "
                     f"{r['slice_us']:.1f} | {r['vs_concat']:.2f} | {r['vs_slice']:.2f} | {r['heads']} |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="cache lengths S")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--heads", nargs="+", default=[f"{HQ}/{HK}"],
                    help="query / kv heads per row set (1/1: one head, where the CPU splits the keys across threads)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--gpt", action="store_true", help="add end-to-end GPT generation (see the header)")
    ap.add_argument("--gpt-prompt", type=int, default=1024)
    ap.add_argument("--gpt-tokens", type=int, default=256)
    ap.add_argument("--gpt-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = tuple(tuple(int(n) for n in pair.split("/")) for pair in args.heads)
    rows = run(tuple(args.lengths), tuple(args.batches), rounds=args.rounds, heads=heads)
    table = markdown(rows)
    print(f"# decoding step against a KV cache, {torch.get_num_threads()} threads, best of {args.rounds} rounds")
    print(table)
    if args.gpt:
        gpt_rows = run_gpt(args.gpt_prompt, args.gpt_tokens, args.gpt_rounds)
        firsts = {tuple(r["tokens"]) for r in gpt_rows}
        if len(firsts) != 1:  # the sides run one model: they must generate the same tokens
            raise SystemExit(f"the GPT sides generated different tokens: {[r['tokens'] for r in gpt_rows]}")
        table += "\n\n" + gpt_markdown(gpt_rows, args.gpt_prompt, args.gpt_tokens)
        print(gpt_markdown(gpt_rows, args.gpt_prompt, args.gpt_tokens))
    write_table(table, args.out, "decode.md")
    return rows


if __name__ == "__main__":
    main()
