"""Model, training, inference, evaluation and conversions: everything that runs the network.

Core modules, shared by all: ``model`` (Llama-2 with LWM's vision embedding and
head), ``ring_attention`` and ``ring_layout`` (RingAttention and its load-balanced
token layouts), ``sharding`` (mesh axes and parameter placement), ``loss``,
``config`` (the typed ``lwm train`` config), ``checkpoint``, ``distributed``,
``run_dir`` and ``run_files``. Then one place each for:

- ``training``: the Grain loader, the optimizer and the train loop;
- ``inference``: the sampler (ring prefill, sharded cache) and dense logits;
- ``evaluation``: held-out loss and the registered evaluation tasks;
- ``convert``: Llama from and to transformers, the VQGAN from diffusers.

The trainer imports :mod:`schemas` and :mod:`pipelines.tokens` (the tokenizers
and prompt layouts), never the Beam data jobs.
"""
