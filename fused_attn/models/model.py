"""A readable reference Transformer whose attention runs on fused_attn's kernels.

Three models built from the same blocks:

* :class:`EncoderDecoder`: "Attention Is All You Need" (post-LN, ``norm_first=False``)
  or its pre-LN variant (``norm_first=True``);
* :class:`GPT`: decoder-only, masked self-attention;
* :class:`BERT`: encoder-only, bidirectional self-attention with a token-prediction head.

Notation in shape comments: B batch, L query length, S key length, H heads, D head dim,
C model dim (``d_model``), V vocabulary size.

The attention implementation is chosen in one place, ``TransformerConfig.backend``,
which is passed as ``backend=`` to :func:`fused_attn.scaled_dot_product_attention`:
a fused backend name (``"triton"``, ``"cuda"``, ``"cpu"``), ``"reference"`` (naive
PyTorch) or None (the fastest one that can run each call). Causal self-attention
reaches the kernels as a causal flag (lower-right aligned while decoding with a KV
cache: the window (-1, 0)), never as a mask tensor; a padding mask (B, 1, 1, S) that pads
each sequence at one end runs in the CPU and Triton kernels as per-sequence key bounds;
attention dropout only the reference backend runs.

Decoding (``init_cache`` / ``decode_step``, and ``fused_attn.models.generation``) keeps each decoder layer's
self-attention keys and values in storage preallocated for ``max_len`` positions and appended in place
(``TransformerConfig.cache = "preallocated"``, the default); a step without gradients, padding mask,
attention dropout or saved weights attends through :func:`fused_attn.attention_with_kvcache`, the others
through the filled part of the same storage. ``cache="paged"`` keeps the same storage in blocks listed by a
:class:`BlockTable` (beam search's reorder shares the beams' full blocks rather than copying every layer's
cache); ``cache="concatenated"`` grows the keys by ``torch.cat`` instead (what the models did before). The
tests check all three give the same tokens.

Under ``torch.compile`` the models' forward (and backward) trace with no graph break, and so
do decoding steps of one token or several (through the storage's filled part: attention_with_kvcache reads
the cache lengths on the host, which would break the graph). (A padding mask under compile stays a mask tensor:
the test that turns it into key bounds reads its values.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kvcache
from ..api import attention_with_kvcache, scaled_dot_product_attention
from ..spec import CausalMode, causal_mask


@dataclass
class TransformerConfig:
    vocab_size: int = 64  # shared by source and target
    d_model: int = 64  # C
    n_heads: int = 4  # H; head dim D = d_model // n_heads
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256  # hidden size of the position-wise feed-forward network
    max_len: int = 256  # longest sequence (learned positions need it; sinusoids are precomputed to it)
    dropout: float = 0.1  # on embeddings, residual branches and inside the FFN
    attn_dropout: float = 0.0  # on attention probabilities; > 0 runs attention on the reference backend
    activation: str = "relu"  # "relu" (the paper) or "gelu" (GPT, BERT)
    norm_first: bool = False  # False: post-LN, as the paper; True: pre-LN (GPT-2 and later)
    positions: str = "sinusoidal"  # "sinusoidal" or "learned"
    tie_weights: bool = True  # output projection shares the (target) token embedding matrix
    bias: bool = True
    backend: Optional[str] = None  # fused_attn backend, "reference", or None for automatic
    # decoding's self-attention cache: "preallocated" (max_len positions per layer, appended in place, steps
    # through fused_attn.attention_with_kvcache), "paged" (the same in blocks of cache_block_size positions
    # listed by a block table: beam search's reorder shares the beams' common blocks) or "concatenated" (grown
    # by torch.cat each step)
    cache: str = "preallocated"
    cache_block_size: int = 16

    def __post_init__(self):
        if self.cache not in ("preallocated", "paged", "concatenated"):
            raise ValueError(f"cache must be 'preallocated', 'paged' or 'concatenated', got {self.cache!r}")
        if not (isinstance(self.cache_block_size, int) and self.cache_block_size >= 1):
            raise ValueError(f"cache_block_size must be an int >= 1, got {self.cache_block_size!r}")

    def cache_capacity(self) -> Optional[int]:
        """The positions a decoding cache preallocates per layer (KVCache.capacity): max_len, or None."""
        return self.max_len if self.cache != "concatenated" else None

    def new_cache(self, memory: Optional[Tensor] = None, memory_padding_mask: Optional[Tensor] = None) -> "KVCache":
        """An empty decoding cache for the decoder's layers, of this config's kind."""
        return KVCache(self.n_decoder_layers, memory, memory_padding_mask, capacity=self.cache_capacity(),
                       block_size=self.cache_block_size if self.cache == "paged" else None)


class BlockTable:
    """A paged cache's block table, shared by the decoder's layers: row b lists the blocks (of ``block_size``
    positions) that hold batch row b's keys in order, ``max_blocks`` of them. Blocks that rows hold in full are
    never written again, so beam search's reorder lets rows share them and copies only a shared partly filled
    block (one per row at most); the blocks no row holds are free for the rows' later positions. The layers'
    pools have ``B * max_blocks`` blocks: enough, as no row holds more than max_blocks."""

    def __init__(self, B: int, max_blocks: int, block_size: int, device):
        self.block_size, self.max_blocks = block_size, max_blocks
        self.rows = [list(range(b * max_blocks, (b + 1) * max_blocks)) for b in range(B)]
        self.table = torch.tensor(self.rows, dtype=torch.int32, device=device)

    def reorder(self, index: List[int], length: int, pools: List[Tensor]) -> None:
        """Rows ``index`` of the table become its rows (each continues an earlier row's first ``length``
        positions): full blocks shared, a partly filled block copied (in every pool) for each row after the
        first that holds it, the blocks past ``length`` taken from the free ones, one row's own each."""
        full, partial = divmod(length, self.block_size)
        rows = [list(self.rows[i][:full]) for i in index]
        held = {blk for row in rows for blk in row}
        firsts = {}  # partial block -> the first new row holding it
        if partial:
            for r, i in enumerate(index):
                firsts.setdefault(self.rows[i][full], r)
        free = [blk for blk in range(len(self.rows) * self.max_blocks) if blk not in held and blk not in firsts]
        for r, i in enumerate(index):
            if partial:
                blk = self.rows[i][full]
                if firsts[blk] != r:  # shared with an earlier row: this row writes a copy
                    own = free.pop()
                    for pool in pools:
                        pool[own] = pool[blk]
                    blk = own
                rows[r].append(blk)
            rows[r] += [free.pop() for _ in range(self.max_blocks - len(rows[r]))]
        self.rows = rows
        self.table = torch.tensor(rows, dtype=torch.int32, device=self.table.device)


@dataclass
class KV:
    """Keys and values of one attention layer kept between decoding steps: grown by concatenation
    (``capacity`` None), or in storage preallocated for ``capacity`` positions on the first step, of which
    the first ``length`` hold keys (the rest are never read)."""

    k: Optional[Tensor] = None  # (B, H, S, D): the keys so far (preallocated: (B, H, capacity, D), S = length;
    v: Optional[Tensor] = None  # paged: (B * max_blocks, H, block_size, D) blocks listed by pages.table)
    capacity: Optional[int] = None
    length: int = 0
    pages: Optional[List[BlockTable]] = None  # paged: a one-element list, the table the layers share
    block_size: Optional[int] = None  # paged: positions per block

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add this step's keys and values (B, H, L, D) after the others."""
        n, L = self.length, k.shape[2]
        if self.capacity is None:
            self.k, self.v = (new if old is None else torch.cat([old, new], dim=2)
                              for old, new in ((self.k, k), (self.v, v)))
            self.length = n + L
            return
        if n + L > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {n} are used and {L} more do not fit")
        self.allocate(k, v)
        if self.pages is None:
            self.k[:, :, n:n + L] = k
            self.v[:, :, n:n + L] = v
        else:
            kvcache.append(self.k, self.v, k, v, [n] * k.shape[0], self.pages[0].table.long())
        self.length = n + L

    def allocate(self, k: Tensor, v: Tensor) -> None:
        """The storage, on the first step (k, v: its keys and values (B, H, L, D), for their shapes)."""
        if self.k is not None:
            return
        B, H, _, D = k.shape
        if self.pages is None:
            self.k, self.v = k.new_empty(B, H, self.capacity, D), v.new_empty(B, H, self.capacity, v.shape[3])
            return
        if self.pages[0] is None:  # (the first layer's first step)
            self.pages[0] = BlockTable(B, -(-self.capacity // self.block_size), self.block_size, k.device)
        blocks = B * self.pages[0].max_blocks
        self.k = k.new_empty(blocks, H, self.block_size, D)
        self.v = v.new_empty(blocks, H, self.block_size, v.shape[3])

    def keys(self) -> Tuple[Tensor, Tensor]:
        """The keys and values so far, (B, H, length, D) (preallocated: views of the storage; paged: the blocks
        gathered in order)."""
        if self.capacity is None:
            return self.k, self.v
        if self.pages is None:
            return self.k[:, :, :self.length], self.v[:, :, :self.length]
        table = self.pages[0].table.long()
        return tuple(kvcache.gathered(t, table)[:, :, :self.length] for t in (self.k, self.v))


@dataclass
class KVCache:
    """Everything incremental decoding keeps: per decoder layer the self-attention keys/values
    of the tokens decoded so far and the cross-attention keys/values of the encoder output.
    ``capacity``: the self-attention keys live in storage preallocated for that many positions (the
    models pass ``max_len``), appended in place, and decoding steps attend through
    ``fused_attn.attention_with_kvcache``; None: they grow by concatenation."""

    n_layers: int
    memory: Optional[Tensor] = None  # (B, S, C) encoder output, for encoder-decoder models
    memory_padding_mask: Optional[Tensor] = None  # (B, S), True = padding
    capacity: Optional[int] = None
    block_size: Optional[int] = None  # with capacity: a paged cache (BlockTable) of blocks this long
    self_kv: List[KV] = field(init=False)  # one per decoder layer
    cross_kv: List[KV] = field(init=False)

    def __post_init__(self):
        pages = None if self.block_size is None or self.capacity is None else [None]  # (made on the first step)
        self.self_kv = [KV(capacity=self.capacity, pages=pages, block_size=self.block_size)
                        for _ in range(self.n_layers)]
        self.cross_kv = [KV() for _ in range(self.n_layers)]

    @property
    def length(self) -> int:
        """Number of target positions decoded so far."""
        return self.self_kv[0].length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search: each beam continues some earlier beam). A paged cache
        reorders its block table (BlockTable.reorder); the others copy the rows of every layer's keys."""
        pages = self.self_kv[0].pages
        if pages is not None and pages[0] is not None:
            pages[0].reorder(index.tolist(), self.length, [t for kv in self.self_kv for t in (kv.k, kv.v)])
        for kv in self.self_kv + self.cross_kv:
            if kv.k is not None and kv.pages is None:
                kv.k, kv.v = kv.k.index_select(0, index), kv.v.index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
        if self.memory_padding_mask is not None:
            self.memory_padding_mask = self.memory_padding_mask.index_select(0, index)


class Attention(nn.Module):
    """Multi-head self-attention (``x`` attends to ``x``) or cross-attention (``x`` attends to ``context``).

    Set ``save_weights = True`` to keep the last call's attention probabilities in
    ``weights`` (B, H, L, S), e.g. for plots; that costs an extra O(L*S) computation.
    """

    def __init__(self, cfg: TransformerConfig, cross: bool):
        super().__init__()
        if cfg.d_model % cfg.n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {cfg.d_model} and {cfg.n_heads}")
        self.cross, self.n_heads, self.d_model = cross, cfg.n_heads, cfg.d_model
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.backend = cfg.backend
        self.save_weights = False
        self.weights: Optional[Tensor] = None

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.d_model // self.n_heads).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, causal: bool = False,
                key_padding_mask: Optional[Tensor] = None, kv: Optional[KV] = None) -> Tensor:
        """x (B, L, C); context (B, S, C) or None; key_padding_mask (B, S), True = padding.

        With ``kv`` (decoding): self-attention appends this call's keys/values to it and
        attends to all of them; cross-attention computes the context's once and reuses them.
        """
        B, L, C = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, L, D)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.cross and kv is not None and kv.k is not None:
            k, v = kv.k, kv.v  # (B, H, S, D), the encoder output's, from the first step
        else:
            k, v = self.kv_proj(x if context is None else context).split(C, dim=2)
            k, v = self._heads(k), self._heads(v)  # (B, H, S, D)
            if kv is not None and self.cross:
                kv.k, kv.v = k, v
            elif kv is not None:
                if kv.capacity is not None and self._cached_step(key_padding_mask, dropout_p):
                    kv.allocate(k, v)
                    table = None if kv.pages is None else kv.pages[0].table
                    y = attention_with_kvcache(q, kv.k, kv.v, k, v, cache_seqlens=kv.length, block_table=table,
                                               causal=causal, backend=self.backend)  # appends in place
                    kv.length += L
                    return self.out_proj(y.transpose(1, 2).reshape(B, L, C))
                kv.append(k, v)
                k, v = kv.keys()
        S = k.shape[2]

        # New queries are the last L of S positions: lower-right causal alignment, which
        # is torch's upper-left ``is_causal`` when L == S.
        # A padding mask (B, 1, 1, S) runs in the kernels as per-sequence key bounds; lower-right
        # causal then comes as the window (-1, 0) (query i sees keys j <= i + S - L).
        mask, is_causal, window = None, False, (-1, -1)
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S), True = may attend
            if causal:
                window = (-1, 0)
        elif causal and L == S:
            is_causal = True
        elif causal and L > 1:  # (one new query, the last position, sees every key: no mask at all)
            window = (-1, 0)
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         window=window, backend=self.backend)  # (B, H, L, D)
        if self.save_weights:
            self.weights = self._probabilities(q, k, mask, causal).detach()
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.out_proj(y)

    def _cached_step(self, key_padding_mask: Optional[Tensor], dropout_p: float) -> bool:
        """Whether a self-attention step with a preallocated cache goes through attention_with_kvcache (no
        gradients, no padding mask, no attention dropout, no saved weights, not traced by torch.compile); other
        steps append to the same storage and attend to its filled part through scaled_dot_product_attention."""
        return (not torch.is_grad_enabled() and key_padding_mask is None and dropout_p == 0.0
                and not self.save_weights and not torch.compiler.is_compiling())

    @staticmethod
    def _probabilities(q: Tensor, k: Tensor, mask, is_causal: bool) -> Tensor:
        """softmax(q k^T / sqrt(D) + mask): (B, H, L, S). Only for inspection."""
        L, S = q.shape[2], k.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, S)
        if is_causal:
            causal = causal_mask(L, S, CausalMode.LOWER_RIGHT, q.device)
            mask = causal if mask is None else mask & causal
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(C, d_ff) -> ReLU/GELU -> dropout -> Linear(d_ff, C)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {cfg.activation!r}")
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class Block(nn.Module):
    """Self-attention (causal or not), optional cross-attention, FFN; each a residual branch with LayerNorm.

    Post-LN (the paper): ``x = LN(x + f(x))``. Pre-LN: ``x = x + f(LN(x))``.
    """

    def __init__(self, cfg: TransformerConfig, causal: bool, cross: bool):
        super().__init__()
        self.causal, self.norm_first = causal, cfg.norm_first
        self.self_attn = Attention(cfg, cross=False)
        self.ln_self = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.ln_cross = nn.LayerNorm(cfg.d_model) if cross else None
        self.ffn = FeedForward(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x: Tensor, ln: nn.LayerNorm, f) -> Tensor:
        if self.norm_first:
            return x + self.dropout(f(ln(x)))
        return ln(x + self.dropout(f(x)))

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                memory_padding_mask: Optional[Tensor] = None, self_kv: Optional[KV] = None,
                cross_kv: Optional[KV] = None) -> Tensor:
        """x (B, L, C); memory (B, S, C) for cross-attention; masks (B, L) / (B, S), True = padding."""
        x = self._residual(x, self.ln_self, lambda h: self.self_attn(
            h, causal=self.causal, key_padding_mask=padding_mask, kv=self_kv))
        if self.cross_attn is not None:
            x = self._residual(x, self.ln_cross, lambda h: self.cross_attn(
                h, memory, key_padding_mask=memory_padding_mask, kv=cross_kv))
        return self._residual(x, self.ln_ffn, self.ffn)


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """The paper's PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(...): (max_len, C)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return pe


class Stack(nn.Module):
    """Token embedding (scaled by sqrt(C)) + positions, then ``n_layers`` Blocks (+ a final LN when pre-LN)."""

    def __init__(self, cfg: TransformerConfig, n_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        else:
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {cfg.positions!r}")
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal, cross) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, idx: Tensor, memory: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                memory_padding_mask: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> Tensor:
        """idx (B, L) token ids -> hidden states (B, L, C). With ``cache``, idx are the next L positions."""
        B, L = idx.shape
        start = 0 if cache is None else cache.length
        if start + L > self.cfg.max_len:
            raise ValueError(f"sequence of {start + L} positions is longer than max_len = {self.cfg.max_len}")
        pos = torch.arange(start, start + L, device=idx.device)
        p = self.pos_emb(pos) if self.cfg.positions == "learned" else self.pos_table[pos].to(self.tok_emb.weight.dtype)
        x = self.dropout(self.tok_emb(idx) * math.sqrt(self.cfg.d_model) + p)  # (B, L, C)
        for i, block in enumerate(self.blocks):
            x = block(x, memory, padding_mask, memory_padding_mask,
                      None if cache is None else cache.self_kv[i], None if cache is None else cache.cross_kv[i])
        return self.ln_final(x)


def _init_weights(model: nn.Module, d_model: int) -> None:
    """Linear: N(0, 0.02); embeddings: N(0, 1/sqrt(C)), so scaled by sqrt(C) they are N(0, 1)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=d_model ** -0.5)


class EncoderDecoder(nn.Module):
    """The paper's Transformer: ``forward(src, tgt)`` gives next-token logits for every target position."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Stack(cfg, cfg.n_encoder_layers, causal=False, cross=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layers, causal=True, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init_weights(self, cfg.d_model)
        if cfg.tie_weights:
            self.lm_head.weight = self.decoder.tok_emb.weight

    def encode(self, src: Tensor, src_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src (B, S) -> memory (B, S, C). src_padding_mask (B, S): True = padding."""
        return self.encoder(src, padding_mask=src_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, src_padding_mask: Optional[Tensor] = None,
               cache: Optional[KVCache] = None) -> Tensor:
        """tgt (B, L) -> logits (B, L, V), each position seeing the target up to itself and all of memory."""
        return self.lm_head(self.decoder(tgt, memory, memory_padding_mask=src_padding_mask, cache=cache))

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Optional[Tensor] = None) -> Tensor:
        return self.decode(tgt, self.encode(src, src_padding_mask), src_padding_mask)

    def init_cache(self, src: Tensor, src_padding_mask: Optional[Tensor] = None) -> KVCache:
        """Encode ``src`` once; the cache then serves :meth:`decode_step`."""
        return self.cfg.new_cache(self.encode(src, src_padding_mask), src_padding_mask)

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The next target tokens (B, L) -> their logits (B, L, V); appends them to ``cache``."""
        return self.decode(tokens, cache.memory, cache.memory_padding_mask, cache)


class GPT(nn.Module):
    """Decoder-only language model: ``forward(idx)`` gives next-token logits (B, L, V)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Stack(cfg, cfg.n_decoder_layers, causal=True, cross=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init_weights(self, cfg.d_model)
        if cfg.tie_weights:
            self.lm_head.weight = self.decoder.tok_emb.weight

    def forward(self, idx: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """Right-padded batches need no padding mask: causal attention never looks right."""
        return self.lm_head(self.decoder(idx, cache=cache))

    def init_cache(self, src: Optional[Tensor] = None) -> KVCache:
        if src is not None:
            raise ValueError("GPT has no encoder: pass the prompt to decode_step, not src")
        return self.cfg.new_cache()

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        return self(tokens, cache)


class BERT(nn.Module):
    """Encoder-only: bidirectional self-attention and a token-prediction head, logits (B, L, V)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Stack(cfg, cfg.n_encoder_layers, causal=False, cross=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init_weights(self, cfg.d_model)
        if cfg.tie_weights:
            self.lm_head.weight = self.encoder.tok_emb.weight

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """idx (B, L); padding_mask (B, L), True = padding (a mask tensor: reference backend)."""
        return self.lm_head(self.encoder(idx, padding_mask=padding_mask))


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Mean token cross-entropy of logits (B, L, V) against targets (B, L), skipping ``ignore_index``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
