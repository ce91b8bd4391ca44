"""The chat-QA data job: long books → contexts of adjacent chunks with generated QA turns, loss on answers.

``pipeline`` is the job (``lwm data chat-qa``), ``contexts`` splits books into
chunks and assembles contexts in LWM's chat template, ``cache`` keeps every
generated pair, and ``generators`` holds the question-answer generators by scheme.
"""
