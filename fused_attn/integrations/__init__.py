"""Integrations of fused_attn with other libraries; each submodule imports its library only when imported.

- :mod:`fused_attn.integrations.transformers`: Hugging Face transformers models run their attention
  through fused_attn (``register()``, then ``attn_implementation="fused_attn"``).
"""
