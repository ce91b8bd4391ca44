"""``needle``: needle in a haystack, the LWM paper's retrieval test (RULER's variable tracking with ``--task``).

"The special magic {city} number is: {7 digits}." is inserted at a sentence boundary
at each depth of filler text and asked for in LWM's chat template; an answer is
correct iff the number appears in it (:mod:`trainer.evaluation.haystack`).
"""

from trainer.evaluation.haystack import NeedleConfig, sweep_task

TASK = sweep_task(
    "needle", NeedleConfig,
    help="needle in a haystack (or RULER variable tracking) over context lengths × depths",
    description="Insert 'The special magic {city} number is: {7 digits}.' at a sentence boundary at each depth of "
    "filler text, ask for it in LWM's chat template and score the greedy answer (correct iff the number appears). "
    "--lengths count whole prompts in tokens. Writes OUT/results.jsonl, OUT/table.txt and OUT/heatmap.png. "
    "Deterministic for a --seed.",
    examples=(
        "lwm eval needle --ckpt runs/tiny --tokenizer tok.model --out needle/  # 1K-4K tokens, 5 depths, 3 rounds",
        "lwm eval needle --ckpt runs/tiny --tokenizer tok.model --lengths 512,1024 --depths 0,0.5,1 --rounds 2 "
        "--haystack books.jsonl --out needle/ --json",
    ))
