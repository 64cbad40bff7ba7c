"""The reference Transformer (encoder-decoder, GPT, BERT) and its decoding, on fused_attn's kernels."""
from .generation import beam_search, greedy_search, sample
from .model import BERT, GPT, EncoderDecoder, KVCache, TransformerConfig

__all__ = ["TransformerConfig", "EncoderDecoder", "GPT", "BERT", "KVCache", "greedy_search", "beam_search",
           "sample"]
