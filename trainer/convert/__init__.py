"""Weights from and to other formats: Llama with transformers (``hf_llama``), the VQGAN from diffusers."""
