"""Everyday conventions of `lwm`: examples in every --help that still parse, -v/-q on every command, quiet
libraries, --json documents, `lwm env`, shell completion, MaxText-style overrides, light commands."""

import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest

from orchestration import cli
from orchestration.commands import EXAMPLES
from tests.test_cli import _leaf_commands

# Command groups with a command whose --help has no examples: section yet (eval's come with its rewrite).
WITHOUT_EXAMPLES = set()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    epilog = parser.epilog or ""
    if EXAMPLES not in epilog:
        return []
    return [line.strip() for line in epilog.split(EXAMPLES, 1)[1].splitlines() if line.strip()]


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def test_every_example_in_every_help_parses_as_the_command_it_documents():
    checked = 0
    for words, parser in _leaf_commands():
        for line in _examples(parser):
            argv = shlex.split(line, comments=True)
            argv = argv[:argv.index(">")] if ">" in argv else argv  # shell redirection is not lwm's
            assert argv[0] == "lwm" and tuple(argv[1:1 + len(words)]) == words, (words, line)
            full = cli.build_parser(words[0], every=False)
            args, extra = full.parse_known_args(argv[1:])
            assert not extra or getattr(args, "accepts_extra", False), (line, extra)
            assert args.func is not None
            checked += 1
    assert checked >= 30


def test_every_command_ends_its_help_with_examples_but_the_listed_ones(capsys):
    without = {words[0] for words, parser in _leaf_commands() if not _examples(parser)}
    assert without == WITHOUT_EXAMPLES
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert capsys.readouterr().out.rstrip().split(f"\n{EXAMPLES}\n")[1].startswith("  lwm train configs/")


def test_every_command_takes_the_same_verbosity_flags():
    for words, parser in _leaf_commands():
        options = {o: a for a in parser._actions for o in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= set(options), words
        assert options["-v"].help == "also show library logs (absl, Orbax, JAX, Beam); -vv: debug logs"


def test_lwm_help_lists_every_group_with_its_summary_without_importing_any():
    out = _run("import sys; from orchestration import cli\n"
               "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
               "print(sorted(m for m in sys.modules if m.startswith('orchestration.commands.')), "
               "'jax' in sys.modules, 'apache_beam' in sys.modules)").stdout
    assert out.rstrip().endswith("[] False False")
    full = cli.build_parser()
    summaries = {a.dest: a.help for a in full._subparsers._group_actions[0]._choices_actions}
    assert summaries == cli.COMMANDS  # the full parser lists the same one-liners


def test_library_warnings_are_quiet_by_default_and_shown_with_v(tmp_path):
    # What `make demo` used to print dozens of times: Orbax's warnings about a read-only checkpoint manager.
    code = ("import logging; from orchestration import cli; cli.main(['env', '--no-devices', '--json'%s]);"
            "import orbax.checkpoint as ocp; logging.getLogger('jax').warning('jax says');"
            f"ocp.CheckpointManager({str(tmp_path)!r}, options=ocp.CheckpointManagerOptions(read_only=True)).close()")
    quiet = _run(code % "")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = _run(code % ", '-v'")
    assert "CheckpointManagerOptions.read_only=True" in loud.stderr and "jax says" in loud.stderr


def test_env_reports_versions_devices_and_tools_as_json(capsys):
    assert cli.main(["env", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"python", "lwm", "libraries", "gcp", "tools", "disk", "env", "jax", "problems"}
    assert set(doc["libraries"]) == {"jax", "jaxlib", "flax", "orbax-checkpoint", "grain", "array-record",
                                     "apache-beam", "sentencepiece"}
    assert doc["jax"]["backend"] == "cpu" and doc["jax"]["device_count"] == 8 and doc["problems"] == []
    assert "xla_force_host_platform_device_count" in doc["env"]["XLA_FLAGS"]


def test_env_names_what_is_missing_with_its_fix_and_exits_1(monkeypatch, capsys):
    from orchestration import environment

    monkeypatch.setattr(environment.shutil, "which", lambda name: None)
    real = environment.package_version
    monkeypatch.setattr(environment, "package_version", lambda name: None if name == "grain" else real(name))
    assert cli.main(["env", "--no-devices"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "missing: Python package grain; fix: pip install -e ." in lines
    assert "missing: ffmpeg on PATH (video jobs and the demo); fix: make system-packages " \
           "(or: sudo apt-get install ffmpeg)" in lines


def test_env_says_where_google_credentials_come_from_never_what_they_are(tmp_path, monkeypatch, capsys):
    secret = tmp_path / "key.json"
    secret.write_text('{"private_key": "SECRET-MATERIAL"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(secret))
    assert cli.main(["env", "--no-devices", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["gcp"]["credentials"] == "GOOGLE_APPLICATION_CREDENTIALS (file found)"
    assert "SECRET" not in out and str(secret) not in out


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_complete_every_command_and_its_flags(shell, capsys):
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for words, parser in _leaf_commands():
        assert all(w in script for w in words), words
    for flag in ("--vocab-size", "--print-config", "--max-tokens", "--no-verify", "--json"):
        assert flag in script
    if shell == "zsh":
        assert script.startswith("#compdef lwm")


def test_completion_of_an_unknown_shell_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["completion", "fish"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fish' (choose from 'bash', 'zsh')" in capsys.readouterr().err


def test_train_takes_key_value_overrides_after_the_config_as_set_does(capsys):
    assert cli.main(["train", "configs/train_tiny.yaml", "steps=70", "optimizer.learning_rate=1e-3",
                     "--print-config"]) == 0
    words = capsys.readouterr().out
    assert cli.main(["train", "configs/train_tiny.yaml", "--set", "steps=70", "--set", "optimizer.learning_rate=1e-3",
                     "--print-config"]) == 0
    assert capsys.readouterr().out == words and "steps: 70\n" in words
    assert cli.main(["train", "configs/train_tiny.yaml", "steps=70", "--set", "steps=80", "--print-config"]) == 0
    assert "steps: 80\n" in capsys.readouterr().out  # --set after the words wins


def test_a_train_word_that_is_not_key_value_is_a_one_line_error(capsys):
    assert cli.main(["train", "configs/train_tiny.yaml", "configs/train_text_32k.yaml"]) == 2
    assert capsys.readouterr().err == ("lwm: error: 'configs/train_text_32k.yaml' after the config is not KEY=VALUE "
                                       "(e.g. steps=50); give one config file, then overrides\n")


@pytest.fixture
def remote(tmp_path, monkeypatch):
    from tests.fake_remote_fs import FakeRemoteFileSystem

    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(tmp_path / "bucket"))
    return tmp_path / "bucket"


def test_train_reads_a_config_from_an_object_store_like_a_local_one(remote, capsys):
    (remote / "configs").mkdir(parents=True)
    with open(os.path.join(ROOT, "configs/train_tiny.yaml")) as f:
        (remote / "configs/tiny.yaml").write_text(f.read())
    assert cli.main(["train", "configs/train_tiny.yaml", "steps=70", "--print-config"]) == 0
    local = capsys.readouterr().out
    assert cli.main(["train", "fakegcs://configs/tiny.yaml", "steps=70", "--print-config"]) == 0
    assert capsys.readouterr().out == local
    assert cli.main(["train", "fakegcs://configs/missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lwm: error: ") and "missing.yaml" in err and err.count("\n") == 1


def test_generate_and_eval_read_the_tokenizer_and_checkpoint_without_beam():
    # Everything below the data-job kit (schemas, pipelines.tokens, trainer) and the two commands load
    # without Beam: its import alone costs more than a second.
    out = _run("import importlib, pathlib, sys; from orchestration import cli\n"
               "for name in ('generate', 'eval'):\n    cli.build_parser(name, every=False)\n"
               "for package in ('schemas', 'pipelines/tokens', 'trainer'):\n"
               "    for path in sorted(pathlib.Path(package).rglob('*.py')):\n"
               "        importlib.import_module('.'.join(path.with_suffix('').parts).removesuffix('.__init__'))\n"
               "print('apache_beam' in sys.modules)")
    assert out.stdout.strip() == "False", out.stderr


def test_tokenizer_train_json_and_quiet(sample_books, tmp_path, capsys):
    out = tmp_path / "tok.model"
    argv = ["tokenizer", "train", "--input", str(sample_books), "--vocab-size", "400", "--output", str(out)]
    assert cli.main(argv + ["--json", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["output"] == str(out) and doc["vocab_size"] == 400 and doc["books"] == 60 and doc["skipped"] == {}
    assert captured.err.startswith("read 60 book(s)")
    first = doc["sha256"]
    assert cli.main(argv + ["--json", "--threads", "1", "-q"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sha256"] == first and captured.err == ""  # the model does not name the cores


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "0", "threads must be >= 1, got 0"),
    ("--input-sentence-size", "-1", "input sentence size must be >= 0 (0: every sentence), got -1"),
])
def test_tokenizer_train_refuses_bad_sampling_settings_in_one_line(sample_books, tmp_path, capsys, flag, value,
                                                                   message):
    argv = ["tokenizer", "train", "--input", str(sample_books), "--vocab-size", "400", "--output",
            str(tmp_path / "t.model"), flag, value]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"lwm: error: {message}\n"


def test_tokenizer_train_samples_sentences_the_same_way_in_every_process(sample_books, tmp_path, capsys):
    argv = ["tokenizer", "train", "--input", str(sample_books), "--vocab-size", "400", "--json",
            "--input-sentence-size", "300"]
    assert cli.main(argv + ["--output", str(tmp_path / "a.model")]) == 0
    here = json.loads(capsys.readouterr().out)["sha256"]
    other = _run(f"from orchestration import cli; cli.main({argv + ['--output', str(tmp_path / 'b.model')]!r})")
    assert json.loads(other.stdout)["sha256"] == here, other.stderr
    assert cli.main(argv[:-2] + ["--output", str(tmp_path / "all.model")]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] != here


def test_sentence_sample_is_uniform_seeded_and_whole_when_small():
    from pipelines.tokens.text_tokenizer import sample_sentences

    assert sample_sentences(map(str, range(5)), 10) == ["0", "1", "2", "3", "4"]
    sample = sample_sentences(map(str, range(10_000)), 1_000)
    assert sample == sample_sentences(map(str, range(10_000)), 1_000) and len(set(sample)) == 1_000
    assert 4_000 < sum(map(int, sample)) / len(sample) < 6_000  # spread over the stream, not its start


def test_data_inspect_json_holds_the_manifest_and_the_record(books_dataset, capsys):
    assert cli.main(["data", "inspect", str(books_dataset), "--record", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    manifest = doc["manifest"]
    assert doc["dataset"] == str(books_dataset) and manifest["seq_len"] == 512 and manifest["records"] > 1
    record = doc["record"]
    assert record["index"] == 1 and record["note"] == ""
    assert sum(s["tokens"] for s in record["segments"]) + record["padding"] == 512
    assert any(span["loss_weight"] > 0 and span["text"] for s in record["segments"] for span in s["spans"])


def test_data_job_json_is_the_summary_as_one_document(sample_books, tokenizer_path, tmp_path, capsys):
    argv = ["data", "books", "--input", str(sample_books), "--tokenizer", tokenizer_path, "--output",
            str(tmp_path / "out"), "--seq-len", "512", "--num-shards", "1", "--json"]
    assert cli.main(argv + ["--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["job"] == "books" and dry["dry_run"] and dry["datasets"] == {}
    assert cli.main(argv + ["-q"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    (directory, manifest), = doc["datasets"].items()
    assert directory.endswith("seq512") and manifest["records"] > 0 and doc["dry_run"] is None
    assert doc["counters"] and captured.err == ""


def test_convert_json_is_one_document_per_conversion(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.test_hf_convert import _hf_model

    _hf_model().save_pretrained(tmp_path / "hf")
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert cli.main(["convert", "hf-import", "--hf-dir", str(tmp_path / "hf"), "--out", str(ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"] == str(ckpt) and doc["parameters"] > 0 and doc["model"]["vocab_size"] == 320
    assert cli.main(["convert", "hf-export", "--ckpt", str(ckpt), "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "hf-llama-safetensors" and "config.json" in doc["files"]
    import numpy as np

    from pipelines.tokens.vqgan import SMALL
    from tests.test_vqgan import random_reference

    frames = np.random.default_rng(2).random((1, 32, 32, 3), dtype=np.float32)
    random_reference(SMALL, frames).save_pretrained(tmp_path / "amused" / "vqvae", safe_serialization=True)
    assert cli.main(["convert", "vqgan-import", "--diffusers-dir", str(tmp_path / "amused"), "--out",
                     str(tmp_path / "vq"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "output": str(tmp_path / "vq"), "block_out_channels": list(SMALL.block_out_channels),
        "codebook": SMALL.num_vq_embeddings, "input_range": [0.0, 1.0]}


@pytest.mark.parametrize("flags, shown", [([], True), (["-q"], False)])
def test_train_progress_lines_are_dropped_with_q(monkeypatch, capsys, flags, shown):
    from trainer.training import loop

    def train(config):
        print(f"step 1/{config.steps} | loss 1.0")
        return loop.TrainResult(step=1, preempted=False, metrics={})

    monkeypatch.setattr(loop, "train", train)
    assert cli.main(["train", "configs/train_tiny.yaml", "steps=70", *flags]) == 0
    assert ("step 1/70" in capsys.readouterr().out) == shown
