"""fused_attn: fused attention kernels (Triton, CUDA C++, CPU) behind torch's SDPA API."""
from .api import (attention_with_kvcache, attention_with_lse, explain_dispatch, scaled_dot_product_attention,
                  varlen_attention)
from .dispatch import use_backend
from . import nn  # noqa: E402  (fused_attn.nn.MultiheadAttention)

__version__ = "0.1.0"
__all__ = ["scaled_dot_product_attention", "attention_with_lse", "varlen_attention", "attention_with_kvcache",
           "explain_dispatch", "use_backend"]
