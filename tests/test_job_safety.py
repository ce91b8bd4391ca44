"""Data jobs never lose a dataset or mistake a typo: inputs checked first, --overwrite swaps at the end,
Ctrl-C and kills leave the old dataset readable, unknown options and unwritable outputs refused."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from orchestration import cli
from trainer.evaluation import synthetic_books as sample_data
from pipelines.kit import packing
from schemas import manifest

SEQ = "seq512"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sample_data.write_books(tmp_path_factory.mktemp("corpus") / "books.jsonl", 200)


def _argv(corpus, output, tokenizer, *extra):
    return ["data", "books", "--input", str(corpus), "--output", str(output), "--tokenizer", str(tokenizer),
            "--seq-len", "512", "--num-shards", "2", *extra]


@pytest.fixture(scope="module")
def built(corpus, tokenizer_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("old")
    assert cli.main(_argv(corpus, output, tokenizer_path, "--text-weight", "0.5")) == 0
    return output


@pytest.fixture
def old_dataset(built, tmp_path):
    """An existing complete dataset (a fresh copy) and the bytes of every file in it."""
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)
    return tmp_path, _snapshot(tmp_path / SEQ)


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _still_old(output, files):
    assert manifest.read(str(output / SEQ)).config["text_weight"] == 0.5  # reads, hashes verified
    assert _snapshot(output / SEQ) == files


@pytest.mark.parametrize("bad", ["tokenizer", "not_a_model", "input", "option"])
def test_a_bad_input_with_overwrite_is_refused_before_the_old_dataset_is_touched(bad, old_dataset, corpus,
                                                                              tokenizer_path, capsys):
    output, files = old_dataset
    (output / "notes.txt").write_text("not a tokenizer")
    tokenizer, inputs, extra = tokenizer_path, corpus, ["--overwrite"]
    if bad == "tokenizer":
        tokenizer = output / "tokenizer.modle"
    elif bad == "not_a_model":
        tokenizer = output / "notes.txt"
    elif bad == "input":
        inputs = output / "nothing*.jsonl"
    else:
        extra.append("--pack-grups=4")
    assert cli.main(_argv(inputs, output, tokenizer, *extra)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lwm: error:"), error
    _still_old(output, files)
    assert not (output / ".staging").exists()


@pytest.mark.parametrize("option", ["--pack-groups", "--num-shards", "--shard-mb"])
def test_a_packing_option_below_one_is_a_one_line_error_before_any_output(option, corpus, tokenizer_path, tmp_path,
                                                                        capsys):
    assert cli.main(_argv(corpus, tmp_path / "new", tokenizer_path, option, "0")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pack_groups, shard_mb and num_shards must be >= 1" in error, error
    assert not (tmp_path / "new").exists()


def test_bad_inputs_create_no_output_directory(corpus, tmp_path):
    assert cli.main(_argv(corpus, tmp_path / "new", tmp_path / "missing.model")) == 2
    assert not (tmp_path / "new").exists()


def test_a_job_failing_midway_with_overwrite_leaves_the_old_dataset(old_dataset, corpus, tokenizer_path, monkeypatch):
    output, files = old_dataset

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(packing, "pack", broken)
    with pytest.raises(Exception, match="disk on fire"):
        cli.main(_argv(corpus, output, tokenizer_path, "--overwrite"))
    _still_old(output, files)
    monkeypatch.undo()
    assert cli.main(_argv(corpus, output, tokenizer_path, "--overwrite")) == 0  # a rerun replaces it
    assert manifest.read(str(output / SEQ)).config["text_weight"] == 1.0
    assert not (output / ".staging").exists()


def _start(corpus, output, tokenizer):
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    # Many shards: the job is still writing them for a while after the first appears.
    argv = [sys.executable, "-m", "orchestration.cli", *_argv(corpus, output, tokenizer, "--overwrite",
                                                              "--num-shards", "200")]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_staging(process, output, timeout=120):
    """Wait until the job writes into its staging directory (mid-job: packing done, shards being written)."""
    deadline = time.time() + timeout
    while not list((output / ".staging").rglob("*.array_record*")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_job_killed_or_interrupted_midway_leaves_the_old_dataset(sig, old_dataset, corpus, tokenizer_path):
    output, files = old_dataset
    process = _start(corpus, output, tokenizer_path)
    _when_staging(process, output)
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    _still_old(output, files)
    if sig == signal.SIGINT:
        assert process.returncode == 130
        assert "Traceback" not in err, err
        assert "is incomplete and readers will refuse it" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("typo, meant", [("--num_shards", "--num-shards"), ("--text-weigth", "--text-weight"),
                                         ("--no-eso", "--no-eos")])
def test_a_misspelled_option_is_an_error_naming_the_closest(typo, meant, corpus, tokenizer_path, tmp_path, capsys):
    argv = _argv(corpus, tmp_path, tokenizer_path) + [typo] + (["3"] if typo != "--no-eso" else [])
    assert cli.main(argv) == 2
    assert f"unknown option {typo}; did you mean {meant}?" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_beam_options_still_pass_through(corpus, tokenizer_path, tmp_path):
    assert cli.main(_argv(corpus, tmp_path, tokenizer_path, "--direct_num_workers=1", "--dry-run")) == 0


def test_an_unwritable_output_is_refused_before_any_work(corpus, tokenizer_path, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(_argv(corpus, tmp_path / "file" / "out", tokenizer_path)) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_is_refused_before_any_work(corpus, tokenizer_path, tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert cli.main(_argv(corpus, tmp_path / "out", tokenizer_path)) == 2
    finally:
        tmp_path.chmod(0o700)
    assert "is not writable" in capsys.readouterr().err


def test_an_empty_bucket_is_warned_with_the_lengths_it_needs(corpus, tokenizer_path, tmp_path, capsys):
    argv = _argv(corpus, tmp_path, tokenizer_path)
    argv[argv.index("--seq-len") + 1] = "512,1024:1000000-"
    assert cli.main(argv) == 0
    assert ("warning: seq1024 is empty: it takes documents of 1000000 or more tokens; of 200 inputs 200 were shorter"
            in capsys.readouterr().err)
    assert manifest.read(str(tmp_path / "seq1024")).records == 0
    assert json.loads((tmp_path / SEQ / "manifest.json").read_text())["records"] > 0
