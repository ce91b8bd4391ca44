"""How text, images and video become token ids, and LWM's prompt layouts: shared by data jobs and inference.

- ``text_tokenizer``: SentencePiece models (never adding BOS/EOS implicitly);
- ``media``: decoding images and videos with ffmpeg, frame sampling, resize and crop;
- ``vqgan``: the VQGAN that turns a 256×256 frame into 16×16 codes and back;
- ``vision_layout``: a vision span's ids (codes, eof/eov, ``<vision>`` tags) and mask;
- ``prompts``: the chat template, its system prompt and the retrieval tasks' wording.

This layer imports only :mod:`schemas` and no Beam, so the trainer's sampler and
evaluation tasks use exactly the code the data jobs trained the model on.
"""
