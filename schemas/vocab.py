"""Vocabulary layout shared by the pipelines and the model (docs/LWM.md, "Vision tokens").

Text and vision tokens live in two separate vocabularies; a per-position boolean
``vision_mask`` says which one a token id belongs to. Vision ids are VQGAN codes
0..8191 plus two frame markers; the rest of the 8448-entry table is reserved.
"""

TEXT_VOCAB_SIZE = 32000  # Llama-2 SentencePiece vocabulary
VISION_CODEBOOK_SIZE = 8192  # aMUSEd VQGAN codebook
VISION_VOCAB_SIZE = 8448  # codebook + 256 reserved ids
EOF_ID = 8192  # vision id closing every frame but the last
EOV_ID = 8193  # vision id closing the last frame of an image or video
VISION_OPEN = "<vision>"  # text (ordinary text tokens) before a vision span
VISION_CLOSE = "</vision>"  # text after a vision span
TOKENS_PER_FRAME = 256  # 16 x 16 codes for a 256 x 256 frame
