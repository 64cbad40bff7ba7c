"""Per-call cost: small attention calls, where the code around the kernel is most of the time,
fused_attn against torch SDPA in the same run.

    python benchmarks/per_call.py --threads 2

Rows (float32, CPU): ``tiny fwd``, q, k, v (1, 1, 8, 16) without grad; ``decode``, q (1, 8, 1, 64)
against k, v (1, 8, 1024, 64) without grad (one decoding step); ``tiny fwd+bwd``, (1, 1, 8, 16)
inputs that require grad, forward then ``out.sum().backward()``. Both sides are called as users call
them: ``fused_attn.scaled_dot_product_attention(q, k, v)`` (automatic backend choice) and
``torch.nn.functional.scaled_dot_product_attention(q, k, v)``.

``--gqa-decode`` adds decoding steps with GQA (issue 15's shapes, one new token against a preallocated
cache): q (B, 32, 1, 128) against k, v (B, 8, S, 128), B 1 or 8, S 1k or 8k, and (1, 8, 1, 64) against
(1, 8, 1024, 64), in float32 and bfloat16, both sides with ``enable_gqa=True``.

Timing: a round calls each side ``--calls`` times back to back, the sides alternating round by round;
a side's figure is its best round (the one a shared machine disturbed least) and the median round is
shown beside it. No profiler runs (bench.py's peak-memory pass would slow small calls). ``ratio`` is
fused_attn's best over torch's best; ``target`` the ratio issue 13 asks for. The table goes to the
screen and, as markdown, to --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fused_attn

# name, q shape, k / v shape, with gradients, ratio asked for (issue 13)
ROWS = (("tiny fwd", (1, 1, 8, 16), (1, 1, 8, 16), False, 2.0),
        ("decode", (1, 8, 1, 64), (1, 8, 1024, 64), False, 1.2),
        ("tiny fwd+bwd", (1, 1, 8, 16), (1, 1, 8, 16), True, 1.2))
SIDES = {"fused_attn": fused_attn.scaled_dot_product_attention, "torch": F.scaled_dot_product_attention}
# --gqa-decode: (B, Hq, Hk, S, E) of one new token per sequence
GQA_DECODE = ((1, 8, 8, 1024, 64), (1, 32, 8, 1024, 128), (8, 32, 8, 1024, 128), (1, 32, 8, 8192, 128))


def call(attention, q_shape, kv_shape, grad: bool, dtype=torch.float32) -> Callable[[], None]:
    """One call of ``attention`` on fresh random inputs (drawn once), with backward where ``grad``; GQA
    (``enable_gqa``) where q has more heads than k and v."""
    q = torch.randn(q_shape, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(kv_shape, dtype=dtype, requires_grad=grad) for _ in range(2))
    kw = {"enable_gqa": True} if q_shape[1] != kv_shape[1] else {}
    if grad:
        return lambda: attention(q, k, v, **kw).sum().backward()
    return lambda: attention(q, k, v, **kw)


def time_rounds(calls: Dict[str, Callable[[], None]], n: int, rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each callable, one figure per round; rounds interleave the callables."""
    for fn in calls.values():  # warm-up: first-call imports, allocator, thread pool
        for _ in range(max(1, n // 4)):
            fn()
    out: Dict[str, List[float]] = {name: [] for name in calls}
    for r in range(rounds):
        names = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in names:
            fn = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) / n)
    return out


def run(calls: int = 1000, rounds: int = 10) -> List[dict]:
    """One row per case: each side's best and median time per call (us), the ratio and its target."""
    torch.manual_seed(0)
    rows = []
    for name, q_shape, kv_shape, grad, target in ROWS:
        n = max(1, calls // 5) if kv_shape[2] > 64 else calls  # the decoding step is ~10x longer
        per_call = time_rounds({side: call(fn, q_shape, kv_shape, grad) for side, fn in SIDES.items()}, n, rounds)
        best = {side: min(ts) * 1e6 for side, ts in per_call.items()}
        median = {side: statistics.median(ts) * 1e6 for side, ts in per_call.items()}
        rows.append(dict(case=name, fused_us=best["fused_attn"], torch_us=best["torch"],
                         fused_median_us=median["fused_attn"], torch_median_us=median["torch"],
                         ratio=best["fused_attn"] / best["torch"], target=target))
    return rows


def run_gqa_decode(calls: int = 1000, rounds: int = 10) -> List[dict]:
    """The --gqa-decode rows, as run()'s (target: None)."""
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, Hq, Hk, S, E in GQA_DECODE:
            n = max(2, calls * 64 // (B * Hk * S // 16))  # about the same time per round for every shape
            per_call = time_rounds({side: call(fn, (B, Hq, 1, E), (B, Hk, S, E), False, dtype)
                                    for side, fn in SIDES.items()}, n, rounds)
            best = {side: min(ts) * 1e6 for side, ts in per_call.items()}
            median = {side: statistics.median(ts) * 1e6 for side, ts in per_call.items()}
            rows.append(dict(case=f"{str(dtype).replace('torch.', '')} ({B}, {Hq}/{Hk}, 1, {S}, {E})",
                             fused_us=best["fused_attn"], torch_us=best["torch"], fused_median_us=median["fused_attn"],
                             torch_median_us=median["torch"], ratio=best["fused_attn"] / best["torch"], target=None))
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| call | fused_attn us (median) | torch SDPA us (median) | ratio | target |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fused_us']:.1f} ({r['fused_median_us']:.1f}) | {r['torch_us']:.1f} "
                     f"({r['torch_median_us']:.1f}) | {r['ratio']:.2f} | "
                     + ("-" if r["target"] is None else f"{r['target']:.1f}") + " |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per round of the tiny cases (decode: a fifth)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--gqa-decode", action="store_true", help="add decoding steps with GQA (see the header)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.calls, args.rounds)
    if args.gqa_decode:
        rows += run_gqa_decode(args.calls, args.rounds)
    table = markdown(rows)
    print(f"# per-call cost, {torch.get_num_threads()} threads, best of {args.rounds} rounds")
    print(table)
    write_table(table, args.out, "per_call.md")
    return rows


def write_table(table: str, out: str, name: str) -> None:
    """The markdown ``table`` to ``out``/``name`` (the folder made if needed), and where it went to the screen."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
