"""Held-out loss: fixed batches, weighted modality means, the same numbers across runs and after resume."""

import json
import shutil

import jax
import pytest

from orchestration import cli
from trainer import checkpoint, config as config_lib
from trainer.evaluation import heldout_loss as evaluate
from trainer.model import PRESETS, init_params
from trainer.loss import LossConfig
from trainer.training.loop import train


def test_modality_means_are_weighted_over_batches_and_combined_as_the_loss_config_says():
    batches = [
        {"text_loss": 2.0, "text_accuracy": 0.5, "text_weight": 3.0, "text_tokens": 3,
         "vision_loss": 0.0, "vision_accuracy": 0.0, "vision_weight": 0.0, "vision_tokens": 0},
        {"text_loss": 4.0, "text_accuracy": 0.0, "text_weight": 1.0, "text_tokens": 1,
         "vision_loss": 6.0, "vision_accuracy": 1.0, "vision_weight": 2.0, "vision_tokens": 2},
    ]
    mean = evaluate.combine(batches, LossConfig())
    assert mean["text_loss"] == pytest.approx(2.5) and mean["text_accuracy"] == pytest.approx(0.375)
    assert mean["vision_loss"] == pytest.approx(6.0) and mean["text_tokens"] == 4
    assert mean["loss"] == pytest.approx(0.5 * 2.5 + 0.5 * 6.0)
    tokens = evaluate.combine(batches, LossConfig(normalization="token_mean"))
    assert tokens["loss"] == pytest.approx((2.5 * 4 + 6.0 * 2) / 6)
    assert "vision_loss" not in evaluate.combine(batches[:1], LossConfig())


def test_dataset_names_skip_bucket_directories():
    assert evaluate.dataset_name("/data/books/seq1024") == "books"
    assert evaluate.dataset_name("/data/heldout/") == "heldout"


def _eval_lines(run_dir, key):
    with open(run_dir / "metrics.jsonl") as f:
        return {m["step"]: m for m in map(json.loads, f) if key in m}


@pytest.mark.slow
def test_training_eval_is_the_same_across_runs_and_unchanged_by_resume(books_dataset, tmp_path, capsys):
    def config(run_dir):
        return config_lib.load("configs/train_tiny.yaml", [
            f"run_dir={run_dir}", f"data.datasets=[{{path: '{books_dataset}'}}]", "data.seq_len=512",
            "steps=4", "optimizer.warmup_steps=1", "checkpoint.save_every=2", "checkpoint.keep=3",
            "checkpoint.async_save=false", "log.every=1", "log.tensorboard=false",
            f"eval.datasets=[{{path: '{books_dataset}'}}]", "eval.every=2", "eval.batches=2"])

    name = evaluate.dataset_name(str(books_dataset))
    key = f"eval/{name}/loss"
    whole = tmp_path / "whole"
    train(config(whole))
    logged = _eval_lines(whole, key)
    assert sorted(logged) == [2, 4] and logged[2][key] != logged[4][key]
    assert f"eval {name}: loss" in capsys.readouterr().out

    resumed = tmp_path / "resumed"  # the same run, stopped after step 2 and resumed
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    (resumed / "metrics.jsonl").write_text("")
    train(config(resumed))
    assert _eval_lines(resumed, key)[4] == logged[4]

    argv = ["eval", "loss", "--ckpt", str(whole), "--step", "2", "--data", str(books_dataset), "--batches", "2",
            "--batch-size", "2", "--sp", "2", "--out", str(tmp_path / "eval.json")]
    assert cli.main(argv) == 0
    first = json.loads((tmp_path / "eval.json").read_text())
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "eval.json").read_text()) == first
    assert first[key] == pytest.approx(logged[2][key], rel=1e-5)
    assert first[f"eval/{name}/text_tokens"] == logged[2][f"eval/{name}/text_tokens"]


def test_eval_section_is_validated():
    with pytest.raises(ValueError, match="eval.datasets is empty"):
        config_lib.load("configs/train_tiny.yaml", ["eval.every=5"])


def test_lwm_eval_loss_reports_the_same_numbers_every_time(books_dataset, tmp_path, capsys):
    config = PRESETS["tiny"]
    checkpoint.save_params(tmp_path / "ckpt", init_params(config, jax.random.key(0)), config)
    argv = ["eval", "loss", "--ckpt", str(tmp_path / "ckpt"), "--data", str(books_dataset), "--batches", "2",
            "--sp", "2", "--out", str(tmp_path / "eval.json")]
    assert cli.main(argv) == 0
    first = json.loads((tmp_path / "eval.json").read_text())
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "eval.json").read_text()) == first
    name = evaluate.dataset_name(str(books_dataset))
    assert first[f"eval/{name}/loss"] == first[f"eval/{name}/text_loss"] > 5.0  # near ln(512) untrained
    assert first[f"eval/{name}/text_tokens"] > 500 and f"eval/{name}/vision_loss" not in first
    assert f"eval {name}: loss" in capsys.readouterr().out
