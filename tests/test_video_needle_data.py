"""`lwm data video-needle`: training exercises in the video needle eval's layout, loss on the answer only."""

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orchestration import cli
from pipelines.kit import inspection
from pipelines.kit.output import OutputConfig
from pipelines.tokens.prompts import VIDEO_NEEDLE_LETTERS, video_needle_question
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import FRAME_TOKENS, Markers, Turn, conversation
from pipelines.tokens.vqgan import VQGAN
from pipelines.vision import needle_exercises as nx
from schemas import vocab
from trainer.evaluation import synthetic_videos
from trainer.evaluation.video_needle import needle_kinds, score


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


def _config(tokenizer_path, tmp_path, **fields):
    fields.setdefault("output", OutputConfig(output=str(tmp_path), buckets="1024"))
    return nx.VideoNeedleDataConfig(inputs=("x.jsonl",), tokenizer=tokenizer_path, vqgan="vq", **fields)


# A pool whose frames tell themselves apart: haystack frame i is all code i, needle kind j all code 4000 + j.
KINDS = needle_kinds()
POOL = nx.Pool(np.repeat(np.arange(20, dtype=np.int32), 256).reshape(20, 16, 16),
               {kind: np.full((16, 16), 4000 + j, np.int32) for j, kind in enumerate(KINDS)})


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 10**6), frames=st.sampled_from([(2,), (3,), (2, 5), (7,)]), options=st.integers(2, 8))
def test_an_exercise_is_an_eval_prompt_with_one_needle_and_loss_on_its_answer_only(tokenizer, tokenizer_path, tmp_path_factory,
                                                                                  index, frames, options):
    config = _config(tokenizer_path, tmp_path_factory.mktemp("x"), frames=frames, options=options)
    markers = Markers.from_tokenizer(tokenizer, SpecialTokens())
    segment = nx.exercise(index, POOL, tokenizer.encode, markers, config)
    learnt = np.flatnonzero(segment.loss_weights)
    prompt, answer = segment.tokens[:learnt[0]], segment.tokens[learnt[0]:]
    assert learnt.tolist() == list(range(learnt[0], len(segment))) and answer[-1] == tokenizer.eos_id
    span = prompt[segment.vision_mask[:learnt[0]]].reshape(-1, FRAME_TOKENS)
    assert len(span) in frames and not segment.vision_mask[learnt[0]:].any()
    needles = [(i, int(f[0]) - 4000) for i, f in enumerate(span) if f[0] >= 4000]
    assert len(needles) == 1 and (span[needles[0][0], :256] == span[needles[0][0], 0]).all()
    name = synthetic_videos.needle_name(*KINDS[needles[0][1]])
    text = tokenizer.decode(answer[:-1])
    letter = text[1]
    assert text == f"({letter}) {name}" and score(text, letter, options)
    question = tokenizer.decode(prompt[1:np.flatnonzero(segment.vision_mask)[0]])
    assert f"({letter}) {name}" in question and question.count("(") == options
    options_listed = [question.split(f"({c}) ")[1].split(" (")[0].split(" Answer")[0] for c in VIDEO_NEEDLE_LETTERS[:options]]
    laid_out, mask = conversation([Turn("user", video_needle_question(options_listed), vision=True)],
                                  span[:, :256].reshape(-1, 16, 16), tokenizer.encode, markers)
    assert prompt.tolist() == laid_out.tolist() and segment.vision_mask[:learnt[0]].tolist() == mask.tolist()


def test_exercises_are_seeded_by_seed_and_index(tokenizer, tokenizer_path, tmp_path):
    markers = Markers.from_tokenizer(tokenizer, SpecialTokens())

    def tokens(index, seed):
        return nx.exercise(index, POOL, tokenizer.encode, markers, _config(tokenizer_path, tmp_path, seed=seed)).tokens.tolist()

    assert tokens(3, 1) == tokens(3, 1)
    assert len({str(tokens(i, s)) for i in range(4) for s in (1, 2)}) == 8


@pytest.fixture(scope="module")
def haystack_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("haystack")
    synthetic_videos.write_video_text(root, 2, seed=3, frames=4, fps=8)
    (root / "videos" / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)
    with (root / "video_text.jsonl").open("a") as listing:
        listing.write(json.dumps({"id": "corrupt", "caption": "noise", "path": "videos/corrupt.mp4"}) + "\n")
    return root


@pytest.fixture(scope="module")
def exercises(haystack_corpus, tokenizer_path, vqgan_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("exercises")
    argv = ["data", "video-needle", "--input", str(haystack_corpus / "video_text.jsonl"), "--output", str(output),
            "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir), "--seq-len", "1024", "--count", "12",
            "--frames", "2,3", "--num-shards", "1", "--encode-batch", "8", "--fps", "8"]
    assert cli.main(argv) == 0
    return output / "seq1024"


def test_the_job_writes_every_exercise_with_the_vqgan_codes_of_its_frames(exercises, haystack_corpus, vqgan_dir,
                                                                          tokenizer):
    from pipelines.tokens import media

    vq = VQGAN.load(str(vqgan_dir))
    haystack = vq.encode(vq.preprocess(np.concatenate([
        media.decode_video(str(haystack_corpus / "videos" / f"video-3-000{i}.mp4"), media.VideoConfig(fps=8))
        for i in range(2)])))
    needles = {kind: vq.encode(vq.preprocess(synthetic_videos.needle_picture(*kind)[None]))[0] for kind in KINDS}
    segments = []
    for record in inspection.records(str(exercises)):
        for s in range(1, int(record["segment_ids"].max()) + 1):
            segments.append({k: v[record["segment_ids"] == s] for k, v in record.items()})
    assert len(segments) == 12
    for segment in segments:
        span = segment["tokens"][segment["vision_mask"]].reshape(-1, FRAME_TOKENS)[:, :256].reshape(-1, 16, 16)
        kinds = [kind for frame in span for kind, codes in needles.items() if (frame == codes).all()]
        answer = tokenizer.decode(segment["tokens"][segment["loss_weights"] > 0][:-1])
        assert len(kinds) == 1 and answer.endswith(synthetic_videos.needle_name(*kinds[0]))
        others = [frame for frame in span if not any((frame == codes).all() for codes in needles.values())]
        assert len(others) == len(span) - 1 and all((haystack == frame).all(axis=(1, 2)).any() for frame in others)
        assert segment["tokens"][segment["vision_mask"]].max() < vocab.VISION_VOCAB_SIZE


def test_a_bad_haystack_video_is_a_dead_letter_and_the_manifest_counts_exercises(exercises):
    letters = [json.loads(line) for line in (exercises / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()]
    assert collections.Counter(d["reason"] for d in letters) == {"corrupt_video": 1}
    counts = json.loads((exercises / "manifest.json").read_text())["counts"]
    assert counts["documents"] == 12 and counts["input_examples"] == 3


def test_exercises_longer_than_every_bucket_are_refused_before_the_job(haystack_corpus, tokenizer_path, vqgan_dir,
                                                                        tmp_path, capsys):
    argv = ["data", "video-needle", "--input", str(haystack_corpus / "video_text.jsonl"), "--output", str(tmp_path),
            "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir), "--seq-len", "1024", "--frames", "2,4"]
    assert cli.main(argv) == 2
    assert "exercises of 4 frames take up to" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_a_haystack_of_only_bad_videos_fails_the_job_naming_why(haystack_corpus, tokenizer_path, vqgan_dir, tmp_path,
                                                                capsys):
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"id": "corrupt", "caption": "noise",
                                    "path": str(haystack_corpus / "videos" / "corrupt.mp4")}) + "\n")
    code = cli.main(["data", "video-needle", "--input", str(only_bad), "--output", str(tmp_path / "out"),
                     "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir), "--seq-len", "1024", "--count", "2"])
    assert code != 0 and "no haystack frames" in capsys.readouterr().err
    assert not (tmp_path / "out" / "seq1024" / "manifest.json").exists()


@pytest.mark.parametrize("fields, message", [({"frames": (1, 3)}, "at least 2"), ({"options": 9}, "options"),
                                             ({"count": 0}, "count")])
def test_config_refuses_impossible_exercises(tokenizer_path, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        _config(tokenizer_path, tmp_path, **fields)
