"""The video needle: the needle frame at its depth, prompts of exactly N frames, scoring, a small sweep."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration import cli
from pipelines.tokens.prompts import VIDEO_NEEDLE_LETTERS
from pipelines.tokens.text_tokenizer import SpecialTokens, TextTokenizer
from pipelines.tokens.vision_layout import Markers
from schemas import vocab
from trainer import checkpoint
from trainer.evaluation import synthetic_videos, task
from trainer.evaluation import video_needle as vn
from trainer.model import PRESETS, init_params

NEEDLE_CODE = 8000


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


def _trial(tokenizer, frames, depth, round_index=0, haystack=10, seed=0):
    codes = np.repeat(np.arange(haystack, dtype=np.int32), 256).reshape(haystack, 16, 16)  # frame i: all codes i
    config = vn.VideoNeedleConfig(seed=seed)
    return vn.build_trial(codes, lambda shape, colour: np.full((16, 16), NEEDLE_CODE, np.int32), tokenizer.encode,
                          Markers.from_tokenizer(tokenizer, SpecialTokens()), options=config.options,
                          rng=vn.trial_rng(config, frames, depth, round_index), frames=frames, depth=depth,
                          round_index=round_index)


@pytest.mark.parametrize("frames", [2, 5, 8, 23])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_needle_is_at_its_depth_among_exactly_n_frames(tokenizer, frames, depth):
    trial = _trial(tokenizer, frames, depth)
    span = trial.tokens[trial.vision_mask].reshape(-1, 257)
    assert len(span) == frames and trial.vision_mask.sum() == 257 * frames
    assert span[:-1, 256].tolist() == [vocab.EOF_ID] * (frames - 1) and span[-1, 256] == vocab.EOV_ID
    needle = [i for i, f in enumerate(span) if (f[:256] == NEEDLE_CODE).all()]
    assert needle == [trial.needle_frame] == [int(np.floor(depth * (frames - 1) + 0.5))]
    assert (trial.tokens[trial.needle_offset:trial.needle_offset + 256] == NEEDLE_CODE).all()
    assert trial.vision_mask[trial.needle_offset]
    haystack = [int(f[0]) for i, f in enumerate(span) if i != trial.needle_frame]
    steps = np.diff(haystack) % 10
    assert len(haystack) == frames - 1 and (steps > 0).all()  # haystack frames in order (wrapping around)


def test_trials_are_seeded_and_options_name_the_needle(tokenizer):
    a, b = _trial(tokenizer, 6, 0.5, 1), _trial(tokenizer, 6, 0.5, 1)
    assert a.tokens.tolist() == b.tokens.tolist() and a.options == b.options and a.expected == b.expected
    assert _trial(tokenizer, 6, 0.5, 2).tokens.tolist() != a.tokens.tolist()
    assert len(a.options) == 4 and len(set(a.options)) == 4
    right = a.options["ABCD".index(a.expected)]
    assert right.split()[-1] in synthetic_videos.NEEDLE_SHAPES
    assert len({o.split()[-1] for o in a.options}) == 4  # the shape alone tells the needle apart
    question = tokenizer.decode(a.tokens[1:np.flatnonzero(a.vision_mask)[0]])
    assert all(f"({letter}) {option}" in question for letter, option in zip("ABCD", a.options))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), options=st.integers(2, 8))
def test_options_hold_the_needle_once_among_other_shapes_in_a_fixed_order(seed, options):
    config = vn.VideoNeedleConfig(seed=seed, options=options)
    kinds = vn.needle_kinds()
    needle, names, letter = vn.draw_needle(options, vn.trial_rng(config, 8, 0.5, 0))
    by_name = {synthetic_videos.needle_name(*k): k for k in kinds}
    listed = [by_name[n] for n in names]
    assert len(names) == options and listed[VIDEO_NEEDLE_LETTERS.index(letter)] == needle
    assert [k for k in listed if k[0] == needle[0]] == [needle]  # the shape alone tells the needle apart
    assert listed == sorted(listed, key=kinds.index)
    shapes = [k[0] for k in listed]
    assert len(set(shapes)) == min(options, len(synthetic_videos.NEEDLE_SHAPES))  # each shape once before any twice


def test_scoring_takes_the_first_option_letter():
    assert vn.score("B", "B", 4) and vn.score("(B) a red star", "B", 4) and vn.score("The answer is B.", "B", 4)
    assert not vn.score("A or B", "B", 4) and not vn.score("Bob", "B", 4) and not vn.score("", "B", 4)
    assert vn.first_letter("Echo D", 4) == "D" and vn.first_letter("E", 4) is None


def test_needle_pictures_differ_from_the_haystack_shapes():
    star = synthetic_videos.needle_picture("star", "red")
    assert star.shape == (256, 256, 3) and star.dtype == np.uint8
    assert len({synthetic_videos.needle_picture(s, "blue").tobytes() for s in synthetic_videos.NEEDLE_SHAPES}) == 4
    with pytest.raises(ValueError, match="needle"):
        synthetic_videos.needle_picture("circle", "red")


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        vn.VideoNeedleConfig(frames=(1,))
    with pytest.raises(ValueError, match="depths"):
        vn.VideoNeedleConfig(depths=(1.5,))
    assert task("video-needle").metric_names(vn.VideoNeedleConfig(frames=(4, 8))) == (
        "video-needle_accuracy/4", "video-needle_accuracy/8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=1024, remat_policy="none")
    path = tmp_path_factory.mktemp("vneedle") / "ckpt"
    checkpoint.save_params(path, init_params(config, jax.random.key(0)), config)
    return path


def _command(ckpt, tokenizer_path, vqgan_dir, tmp_path):
    synthetic_videos.write_video_text(tmp_path / "hay", 2, frames=3, fps=4)
    videos = sorted(str(p) for p in (tmp_path / "hay" / "videos").glob("*.mp4"))
    return ["eval", "video-needle", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir),
            "--depths", "0,1", "--rounds", "1", "--max-tokens", "2", "--haystack-videos", *videos,
            "--out", str(tmp_path / "out")]


def test_frame_counts_beyond_the_context_are_refused_naming_the_largest(ckpt, tokenizer_path, vqgan_dir, tmp_path,
                                                                         capsys):
    code = cli.main(_command(ckpt, tokenizer_path, vqgan_dir, tmp_path) + ["--frames", "2,5"])
    err = capsys.readouterr().err
    assert code == 2 and "the largest frame count that fits is 3" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_small_sweep_writes_results_table_heatmap_and_metrics(ckpt, tokenizer_path, vqgan_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(_command(ckpt, tokenizer_path, vqgan_dir, tmp_path) + ["--frames", "2,3", "--json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["metrics"]) == {"video-needle_accuracy/2", "video-needle_accuracy/3"}
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["frames"], r["depth"], r["needle_frame"]) for r in records] == [(2, 0.0, 0), (2, 1.0, 1), (3, 0.0, 0),
                                                                               (3, 1.0, 2)]
    assert {"needle_offset", "options", "expected", "answer", "correct"} <= set(records[0])
    assert (out / "heatmap.png").stat().st_size > 0 and "depth \\ frames" in (out / "table.txt").read_text()
