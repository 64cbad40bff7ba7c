"""Dropout of the attention probabilities (fused_attn/dropout.py): one Philox stream that every
backend draws the same way, seeded from torch's generator."""
import pytest
import torch

import fused_attn
from fused_attn import dropout, reference


def test_philox_known_answers():
    # Random123's published Philox-4x32-10 test vectors (kat_vectors): counter, key -> output.
    zero = torch.zeros((), dtype=torch.int64)
    assert [int(x) for x in dropout.philox(0, zero, zero, zero, zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                          0x9B00DBD8]
    ones = torch.full((), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(x) for x in dropout.philox(0xFFFFFFFFFFFFFFFF, ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_reference_is_reproducible_and_drops():
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(5)
    a = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(5)
    b = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    assert torch.equal(a, b)
    assert not torch.allclose(a, fused_attn.scaled_dot_product_attention(q, k, v, backend="reference"))
