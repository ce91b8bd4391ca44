"""Weights from and to other formats: Llama with transformers (``hf_llama``, tokenizer files included),
the VQGAN from diffusers (``vqgan_diffusers``), LWM's Jax releases (``lwm_release``, over the streaming
checkpoint format ``lwm_streaming``; their VQGAN pickle via ``lwm_vqgan`` and ``restricted_pickle``)."""
