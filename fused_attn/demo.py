"""Train a small encoder-decoder Transformer to spell numbers, on fused_attn's attention.

    python -m fused_attn.demo [--steps N] [--out DIR] [--fast]

The task is generated in code: the digits of a number in, its English words out
("4 0 7" -> "four hundred seven"). Numbers of 1 to ``--digits`` digits; a fixed set of
them is held out and never trained on. The model is the reference Transformer of
:mod:`fused_attn.models` (post-LN, as in "Attention Is All You Need"); attention runs on
the fastest fused_attn backend that can run it, printed at the start. Batches hold
numbers of one length, so no padding mask is needed and every attention call is causal
or unmasked: the calls the fused kernels run.

Prints exact-match accuracy of greedy and beam-search decoding on the held-out numbers
and saves heatmaps of the decoder's cross-attention (which digit each word looks at)
to ``--out`` (default ``demo_out/``).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import explain_dispatch
from .models import EncoderDecoder, TransformerConfig, beam_search, greedy_search
from .models.model import cross_entropy

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
VOCAB = SPECIALS + list("0123456789") + ONES + TENS[2:] + ["hundred", "thousand", "million"]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def number_to_words(n: int) -> List[str]:
    """English words of 0 <= n < 10**9, without "and": 407 -> ["four", "hundred", "seven"]."""
    if n == 0:
        return ["zero"]
    words: List[str] = []
    for value, name in ((10 ** 6, "million"), (1000, "thousand")):
        if n >= value:
            words += number_to_words(n // value) + [name]
            n %= value
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        n %= 10
    if n > 0:
        words.append(ONES[n])
    return words


class NumberTask:
    """Numbers of 1..max_digits digits; ``n_test`` of them (of 3 or more digits) are held out."""

    def __init__(self, max_digits: int, n_test: int, seed: int):
        self.max_digits = max_digits
        self.rng = random.Random(seed)
        # every 1- and 2-digit number is needed to learn the words, so none is held out
        self.test = sorted(self.rng.sample(range(100, 10 ** max_digits), n_test))
        self.held_out = set(self.test)

    def sample(self, size: int) -> List[int]:
        """Training numbers, all of one (uniformly drawn) digit count, never a held-out one."""
        digits = self.rng.randint(1, self.max_digits)
        low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
        numbers: List[int] = []
        while len(numbers) < size:
            n = self.rng.randrange(low, high)
            if n not in self.held_out:
                numbers.append(n)
        return numbers

    def batch(self, size: int):
        """(src, decoder input, decoder target) of a training batch; see :func:`encode`."""
        return encode(self.sample(size))


def encode(numbers: Sequence[int]):
    """Numbers of one digit count -> src (B, S) digits, tgt_in (B, T) BOS + words, tgt_out (B, T) words + EOS."""
    src = torch.tensor([[TOKEN_ID[c] for c in str(n)] for n in numbers])
    words = [[TOKEN_ID[w] for w in number_to_words(n)] for n in numbers]
    T = max(len(w) for w in words) + 1
    tgt_in = torch.full((len(numbers), T), PAD)
    tgt_out = torch.full((len(numbers), T), PAD)
    for i, w in enumerate(words):
        tgt_in[i, : len(w) + 1] = torch.tensor([BOS] + w)
        tgt_out[i, : len(w) + 1] = torch.tensor(w + [EOS])
    return src, tgt_in, tgt_out


def decode_words(ids: Sequence[int]) -> List[str]:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i != PAD:
            out.append(VOCAB[i])
    return out


def choose_backend(cfg: TransformerConfig, batch: int = 64, length: int = 8):
    """The first backend, in fused_attn's automatic order, that runs the model's attention calls
    (causal self-attention and unmasked cross-attention), and why the ones before it refuse."""
    H, D = cfg.n_heads, cfg.d_model // cfg.n_heads
    q, k, v = (torch.randn(batch, H, length, D) for _ in range(3))
    causal, plain = explain_dispatch(q, k, v, is_causal=True), explain_dispatch(q, k, v)
    reasons = {}
    for name in causal:
        why = causal[name] or plain[name]
        if why is None:
            return name, reasons
        reasons[name] = why
    raise RuntimeError(f"no fused_attn backend can run the demo's attention: {reasons}")


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.start = total, width, time.perf_counter()

    def update(self, done: int, text: str = "") -> None:
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done == self.total else ""
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} {text} {time.perf_counter() - self.start:5.1f}s{end}")
        sys.stderr.flush()


def train(model: EncoderDecoder, task: NumberTask, steps: int, batch_size: int, lr: float,
          show_progress: bool = True) -> float:
    """Adam with linear warmup and cosine decay; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01, foreach=True)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    progress = Progress(steps) if show_progress else None
    model.train()
    loss_avg = None
    for step in range(1, steps + 1):
        src, tgt_in, tgt_out = task.batch(batch_size)
        loss = cross_entropy(model(src, tgt_in), tgt_out, ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if progress is not None and (step % 20 == 0 or step == steps):
            progress.update(step, f"loss {loss_avg:.3f}")
    model.eval()
    return loss_avg


def _by_length(numbers: Sequence[int]) -> Dict[int, List[int]]:
    groups: Dict[int, List[int]] = {}
    for n in numbers:
        groups.setdefault(len(str(n)), []).append(n)
    return groups


def evaluate(model: EncoderDecoder, numbers: Sequence[int], num_beams: int, max_new_tokens: int = 16):
    """Exact-match accuracy of greedy and beam decoding, and a few wrong answers."""
    correct = {"greedy": 0, "beam": 0}
    mistakes = []
    for group in _by_length(numbers).values():
        src, _, _ = encode(group)
        start = torch.full((len(group), 1), BOS)
        outputs = {"greedy": greedy_search(model, src, start, max_new_tokens, eos_id=EOS, pad_id=PAD),
                   "beam": beam_search(model, src, start, max_new_tokens, eos_id=EOS, pad_id=PAD,
                                       num_beams=num_beams)[0]}
        for name, out in outputs.items():
            for n, ids in zip(group, out.tolist()):
                ok = decode_words(ids) == number_to_words(n)
                correct[name] += ok
                if not ok and name == "greedy" and len(mistakes) < 5:
                    mistakes.append((n, " ".join(decode_words(ids))))
    return {k: v / len(numbers) for k, v in correct.items()}, mistakes


def save_heatmaps(model: EncoderDecoder, numbers: Sequence[int], out_dir: str) -> List[str]:
    """For each number, a PNG of the decoder's cross-attention (mean over layers and heads):
    one row per output word (the row of the position that predicts it), one column per input digit."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install fused_attn[test]): no heatmaps", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    layers = [block.cross_attn for block in model.decoder.blocks]
    paths = []
    for n in numbers:
        src, _, _ = encode([n])
        out = greedy_search(model, src, torch.full((1, 1), BOS), 16, eos_id=EOS, pad_id=PAD)
        words = decode_words(out[0].tolist()) + ["<eos>"]
        tgt_in = torch.tensor([[BOS] + [TOKEN_ID[w] for w in words[:-1]]])
        for attn in layers:
            attn.save_weights = True
        with torch.no_grad():
            model(src, tgt_in)
        for attn in layers:
            attn.save_weights = False
        weights = torch.stack([attn.weights[0] for attn in layers]).mean(dim=(0, 1))  # (layers, H, L, S) -> (L, S)
        fig, ax = plt.subplots(figsize=(1.5 + 0.5 * src.shape[1], 1.0 + 0.4 * len(words)))
        ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(src.shape[1]), list(str(n)))
        ax.set_yticks(range(len(words)), words)
        ax.set_xlabel("input digit")
        ax.set_ylabel("predicting")
        ax.set_title(f"{n}: cross-attention", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"cross_attention_{n}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m fused_attn.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default 2000)")
    parser.add_argument("--fast", action="store_true",
                        help="a quick run for tests: defaults of --digits 4 --steps 600 --test-size 100")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--digits", type=int, help="numbers have 1 to this many digits, 3 to 9 (default 6)")
    parser.add_argument("--test-size", type=int, help="held-out numbers (default 300)")
    parser.add_argument("--beams", type=int, default=4, help="beam width (default 4)")
    parser.add_argument("--backend", default=None, help="fused_attn backend (default: the fastest that runs it)")
    parser.add_argument("--out", default="demo_out", help="where the heatmaps go (default demo_out/)")
    parser.add_argument("--plots", type=int, default=4, help="number of heatmaps (default 4; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model's matrices are too small to gain from more)")
    args = parser.parse_args(argv)
    defaults = {"digits": 4, "steps": 600, "test_size": 100} if args.fast else {"digits": 6, "steps": 2000,
                                                                                 "test_size": 300}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 3 <= args.digits <= 9:
        parser.error(f"--digits must be from 3 to 9, got {args.digits}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    cfg = TransformerConfig(vocab_size=len(VOCAB), d_model=64, n_heads=4, n_encoder_layers=2,
                            n_decoder_layers=2, d_ff=128, max_len=32, dropout=0.0, norm_first=False)
    if args.backend is None:
        chosen, refused = choose_backend(cfg)
        why = "; ".join(f"{n}: {r}" for n, r in refused.items())
        print(f"attention backend: {chosen}" + (f" (faster ones refuse: {why})" if why else ""))
        # automatic choice per call, except that falling back to the reference was just explained
        cfg.backend = "reference" if chosen == "reference" else None
    else:
        cfg.backend = args.backend
        print(f"attention backend: {cfg.backend} (asked for)")
    task = NumberTask(args.digits, args.test_size, args.seed)
    model = EncoderDecoder(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"task: digits -> English words, numbers below {10 ** args.digits:,}, {args.test_size} held out; "
          f"model: {n_params / 1e3:.0f}k parameters, {args.steps} steps of {args.batch_size}")
    loss = train(model, task, args.steps, args.batch_size, args.lr)
    t_train = time.perf_counter() - t0
    acc, mistakes = evaluate(model, task.test, args.beams)
    print(f"held-out exact match: greedy {acc['greedy']:.1%}, beam search (width {args.beams}) "
          f"{acc['beam']:.1%}  (final training loss {loss:.3f})")
    for n, said in mistakes:
        print(f"  e.g. {n}: {' '.join(number_to_words(n))!r}, model said {said!r}")
    examples = task.test[:: max(1, len(task.test) // max(1, args.plots))][: args.plots]
    for path in save_heatmaps(model, examples, args.out):
        print(f"saved {path}")
    print(f"time: {t_train:.0f}s training, {time.perf_counter() - t0:.0f}s in all")
    return {"greedy": acc["greedy"], "beam": acc["beam"], "loss": loss, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
