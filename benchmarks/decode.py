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

Speedups are torch's time over fused_attn's (best round of each; timing as benchmarks/per_call.py);
targets (issue 15): 1.5 over concat, 1.2 over slice. ``--lengths`` picks the cache lengths (the smoke
test runs a short one). The table goes to the screen and, as markdown, to --out/decode.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_attn  # noqa: E402
from per_call import time_rounds  # noqa: E402

HQ, HK, E = 32, 8, 128
SPARE = 128  # preallocated slots past the step's keys
TARGETS = {"concat": 1.5, "slice": 1.2}


def sides(B: int, S: int, dtype: torch.dtype) -> Dict[str, Callable[[], None]]:
    """One decoding step of each side on fresh random inputs (drawn once; caches filled with random keys)."""
    q = torch.randn(B, HQ, 1, E, dtype=dtype)
    k_new, v_new = (torch.randn(B, HK, 1, E, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, HK, S + SPARE, E, dtype=dtype) for _ in range(2))
    k_past, v_past = (c[:, :, :S - 1].clone() for c in (k_cache, v_cache))
    lengths = torch.full((B,), S - 1, dtype=torch.int32)

    def fused():
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths)

    def concat():
        k, v = torch.cat((k_past, k_new), 2), torch.cat((v_past, v_new), 2)
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def slice_():
        k_cache[:, :, S - 1:S].copy_(k_new)
        v_cache[:, :, S - 1:S].copy_(v_new)
        F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], enable_gqa=True)
    return {"fused": fused, "concat": concat, "slice": slice_}


def run(lengths=(1024, 8192, 32768), batches=(1, 8), dtypes=(torch.float32, torch.bfloat16),
        rounds: int = 5) -> List[dict]:
    """One row per (dtype, B, S): each side's best time per step (us) and torch's over fused_attn's."""
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for B in batches:
                for S in lengths:
                    n = max(1, 200_000 // (B * S))  # calls per round: about the same time for every shape
                    times = time_rounds(sides(B, S, dtype), n, rounds)
                    best = {side: min(ts) * 1e6 for side, ts in times.items()}
                    rows.append(dict(dtype=str(dtype).replace("torch.", ""), B=B, S=S, **{f"{k}_us": v for k, v in
                                                                                             best.items()},
                                     vs_concat=best["concat"] / best["fused"], vs_slice=best["slice"] / best["fused"]))
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| dtype | B | S | fused us | torch concat us | torch slice us | speedup vs concat (target 1.5) "
             "| speedup vs slice (target 1.2) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['B']} | {r['S']} | {r['fused_us']:.1f} | {r['concat_us']:.1f} | "
                     f"{r['slice_us']:.1f} | {r['vs_concat']:.2f} | {r['vs_slice']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="cache lengths S")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(tuple(args.lengths), tuple(args.batches), rounds=args.rounds)
    table = markdown(rows)
    print(f"# decoding step against a KV cache, {torch.get_num_threads()} threads, best of {args.rounds} rounds")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode.md")
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"# wrote {path}")
    return rows


if __name__ == "__main__":
    main()
