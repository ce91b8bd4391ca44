"""``lwm data lwm-jsonl`` against a reference of LWM's vision-text processor, written from its documented rules.

The reference (``lwm_processor``) follows ``docs/data.md`` and ``VisionTextProcessor``
in LWM's ``lwm/data.py``: BOS (no loss), the comma-separated fields, EOS (loss).
"""

import json
import random

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from orchestration import cli
from pipelines import lwm_jsonl
from pipelines.tokens.media import sample_frame_indices
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import Markers
from schemas import manifest as manifest_lib
from schemas import packed


def lwm_processor(example, index, tok, fields_key="fields", max_n_frames=-1):
    """(tokens, loss masks, vision masks) as LWM's processor makes them (without its stray BOS ids)."""
    fields = example[fields_key]
    if isinstance(fields, list):
        fields = random.Random(index).choice(fields)
    tokens, masks, vision = [tok.bos_id], [0.0], [False]
    for field in fields.split(","):
        mask = 1.0
        if field.startswith("[") and field.endswith("]"):
            field, mask = field[1:-1], 0.0
        if field == "<|bos|>":
            tokens, masks, vision = tokens + [tok.bos_id], masks + [mask], vision + [False]
        elif field == "<|eos|>":
            tokens, masks, vision = tokens + [tok.eos_id], masks + [mask], vision + [False]
        elif "vision" in field:
            codes = example[field]
            n = len(codes) // 256
            if max_n_frames > 0 and n > max_n_frames:
                idxs = np.linspace(0, n - 1, max_n_frames).astype(int)
                codes = [c for i in idxs for c in codes[i * 256:(i + 1) * 256]]
                n = max_n_frames
            start, end = list(tok.encode("<vision>")), list(tok.encode("</vision>"))
            span = list(start)
            for j in range(n):
                span += codes[j * 256:(j + 1) * 256] + [8193 if j == n - 1 else 8192]
            span += end
            tokens += span
            masks += [mask] * len(span)
            vision += [False] * len(start) + [True] * (257 * n) + [False] * len(end)
        else:
            text = " ".join(example[s] for s in field.split("+"))
            ids = list(tok.encode(text))
            tokens, masks, vision = tokens + ids, masks + [mask] * len(ids), vision + [False] * len(ids)
    return tokens + [tok.eos_id], masks + [1.0], vision + [False]


def _frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, 8192, 256 * n).tolist()


GOLDEN = [
    {"fields": "[question],answer", "question": "What is the color of the cat?", "answer": "It is yellow."},
    {"fields": "<|bos|>,text,[<|eos|>]", "text": "A long book."},
    {"fields": "[title+question],answer", "title": "The cat", "question": "what color?", "answer": "yellow"},
    {"fields": "[vision],caption", "vision": _frames(2), "caption": "A cat on a mat."},
    {"fields": "[caption],vision_video", "vision_video": _frames(5, 1), "caption": "Fireworks."},
    {"fields": ["[vision],caption", "caption,vision", "[caption],[vision],<|eos|>"], "vision": _frames(1, 2),
     "caption": "A dog."},
    {"fields": ["[vision],caption", "caption,vision"], "vision": _frames(3, 3), "caption": "Two dogs."},
]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return TextTokenizer(tokenizer_path)


def _ours(example, index, tok, **config):
    config = lwm_jsonl.LwmJsonlConfig(inputs=("x",), tokenizer="t", output=None, **config)
    markers = Markers.from_tokenizer(tok, SpecialTokens())
    return lwm_jsonl.lay_out_line(example, index, tok.encode, markers, config)


@pytest.mark.parametrize("index", range(len(GOLDEN)))
@pytest.mark.parametrize("max_n_frames", [-1, 3])
def test_golden_examples_match_lwms_processor(tok, index, max_n_frames):
    example = GOLDEN[index]
    tokens, vision_mask, weights = _ours(example, index, tok, max_n_frames=max_n_frames)
    want_tokens, want_masks, want_vision = lwm_processor(example, index, tok, max_n_frames=max_n_frames)
    assert tokens.tolist() == want_tokens
    assert weights.tolist() == want_masks
    assert vision_mask.tolist() == want_vision


def test_a_list_of_specs_is_chosen_per_line_by_its_index(tok):
    example = GOLDEN[5]
    chosen = {len(_ours(example, i, tok)[0]) for i in range(12)}
    assert len(chosen) > 1  # different lines choose different specs
    assert _ours(example, 0, tok, fields_index=1)[0].tolist() == lwm_processor(
        {**example, "fields": example["fields"][1]}, 0, tok)[0]


def test_sample_frame_indices_is_lwms_linspace_rule():
    assert sample_frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_frame_indices(7, 3).tolist() == [0, 3, 6]
    assert sample_frame_indices(5, 4).tolist() == [0, 1, 2, 4]  # truncated, not rounded
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2] and sample_frame_indices(3, -1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("example,reason,detail", [
    ({"fields": "[vision],caption", "vision": [1] * 300, "caption": "c"}, "bad_vision", "not a positive multiple"),
    ({"fields": "[vision],caption", "vision": [8192] * 256, "caption": "c"}, "bad_vision", "code 8192"),
    ({"fields": "[vision],caption", "vision": ["a"] * 256, "caption": "c"}, "bad_vision", "not a list of integer"),
    ({"fields": "[vision],caption", "caption": "c"}, "missing_field", "no 'vision' field"),
    ({"fields": "question,answer", "question": "q"}, "missing_field", "no text field 'answer'"),
    ({"question": "q"}, "missing_field", "no 'fields' field"),
    ({"fields": 3}, "bad_fields", "'fields' is not"),
])
def test_malformed_lines_are_dead_letters_with_their_reason(tok, example, reason, detail):
    got = _ours(example, 0, tok)
    assert got[0] == reason and detail in got[1], got


def test_lwm_jsonl_job_writes_packed_examples_and_dead_letters(tokenizer_path, tok, tmp_path):
    bad = json.dumps({"fields": "[vision],c", "vision": [1] * 3, "c": "x"})
    lines = [json.dumps(e) for e in GOLDEN[:5]] + ["", bad, "not json"]
    src = tmp_path / "lwm.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli.main(["data", "lwm-jsonl", "--input", str(src), "--tokenizer", tokenizer_path, "--output", str(out),
                     "--seq-len", "2048", "--num-shards", "1"]) == 0
    m = manifest_lib.read(str(out / "seq2048"))
    assert m.counts["documents"] == 5
    records = [packed.decode(r, 2048) for path in manifest_lib.shard_paths(str(out / "seq2048"), m)
               for r in ArrayRecordReader(path).read_all()]
    tokens = sorted(int(((r["segment_ids"] > 0)).sum()) for r in records)
    want = sum(len(lwm_processor(e, i, tok)[0]) for i, e in enumerate(GOLDEN[:5]))
    assert sum(tokens) == want
    vision = sum(int(r["vision_mask"].sum()) for r in records)
    assert vision == 257 * (2 + 5)
    dead = [json.loads(line) for line in (out / "seq2048" / manifest_lib.DEAD_LETTER_FILE).read_text().splitlines()]
    assert sorted(d["reason"] for d in dead) == ["bad_vision", "invalid_json"]
    assert {d["source"] for d in dead} == {f"{src}:7", f"{src}:8"}
