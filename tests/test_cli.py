"""The `lwm` command line: help that tells the truth, and user errors as one line with exit status 2."""

import argparse
import re
import subprocess
import sys

import pytest
import yaml

from orchestration import cli
from trainer import config as config_lib

MISSING = "/no/such/input"


def _leaf_commands(parser=None, prefix=()):
    """``(words, parser)`` for every runnable sub-command, found as `lwm ... --help` would show them."""
    parser = parser or cli.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return [(prefix, parser)]
    return [leaf for name, sub in actions[0].choices.items() for leaf in _leaf_commands(sub, prefix + (name,))]


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_lwm_help_lists_exactly_the_commands_that_run(capsys):
    text = _help([], capsys)
    commands = text.split("COMMAND\n", 1)[1].split("\noptions:")[0]
    listed = set(re.findall(r"^    ([a-z-]+)", commands, re.MULTILINE))
    assert listed == set(cli.COMMAND_MODULES)
    for words, _ in _leaf_commands():
        assert words[0] in listed
        assert "usage: lwm " + " ".join(words) in _help(list(words), capsys)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"lwm \S+.*\n", capsys.readouterr().out)


def _argv_with_missing_inputs(words, parser, tmp_path):
    """The command with every required argument given: outputs under ``tmp_path``, inputs that do not exist."""
    argv = list(words)
    chosen = [g._group_actions[0] for g in parser._mutually_exclusive_groups if g.required]
    for action in parser._actions:
        if not (action.required or not action.option_strings or action in chosen):
            continue
        name = action.dest
        if name in ("output", "out"):
            value = str(tmp_path / name)
        elif action.choices:
            value = next(iter(action.choices))
        else:
            value = next(v for v in (MISSING, "1024") if _parses(action, v))
        argv += ([action.option_strings[0]] if action.option_strings else []) + [value]
    return argv


def _parses(action, value):
    try:
        return action.type is None or action.type(value) is not None
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def test_every_command_reports_a_missing_input_in_one_line_with_exit_2(tmp_path, capsys):
    commands = [(w, p) for w, p in _leaf_commands() if any((a.required or not a.option_strings) and not a.choices
                                                          for a in p._actions if a.dest != "help")]
    assert len(commands) >= 8
    for words, parser in commands:
        argv = _argv_with_missing_inputs(words, parser, tmp_path)
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lwm: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err and "/no/such" in err, (argv, err)


def test_unreadable_and_malformed_config_files_are_one_line_errors(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    assert cli.main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"lwm: error: {bad}: not valid YAML")
    assert cli.main(["train", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"lwm: error: {tmp_path}: Is a directory: give a file, not a directory\n"
    from orchestration.commands import train as train_command

    def reads_yaml(args, extra):
        with open(bad) as f:
            return yaml.safe_load(f)

    monkeypatch.setattr(train_command, "run", reads_yaml)  # any command's YAML error, caught by the CLI
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lwm: error: {bad}, line 2: not valid YAML (") and err.count("\n") == 1


def test_train_help_lists_every_config_key_with_its_default_and_print_config_resolves(tmp_path, capsys):
    text = _help(["train"], capsys)
    for line in config_lib.help_text().splitlines():
        assert line.split(" = ")[0] in text
    assert "optimizer.learning_rate = 4e-05" in text and "--print-config" in text
    assert cli.main(["train", "configs/train_tiny.yaml", "--set", "steps=50", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["steps"] == 50 and "preset" not in printed
    path = tmp_path / "resolved.yaml"
    path.write_text(printed)
    assert config_lib.load(path) == config_lib.load("configs/train_tiny.yaml", ["steps=50"])


def test_convert_reads_model_fields_through_the_typed_config(tmp_path, capsys):
    fields = tmp_path / "model.yaml"
    fields.write_text("n_layers: 2\n")
    argv = ["convert", "hf-import", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--preset", "tiny"]
    assert cli.main(argv + ["--config", str(fields)]) == 2
    expected = f"lwm: error: {fields}: unknown key 'n_layers'; did you mean {fields}.num_layers?\n"
    assert capsys.readouterr().err == expected
    argv[-1] = "gpt-2"
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("lwm: error: model.preset: unknown model preset 'gpt-2'; choose from")


def test_a_data_command_starts_without_loading_jax_or_torch():
    code = ("import sys; from orchestration import cli; cli.build_parser(cli.command_group(['data', 'books']));"
            "print(sorted(m for m in ('jax', 'torch', 'trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_command_group_is_the_first_word_when_it_names_one():
    assert cli.command_group(["data", "books", "--input", "x"]) == "data"
    assert cli.command_group(["--version"]) is None
    assert cli.command_group(["datta", "books"]) is None
