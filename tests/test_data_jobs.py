"""The data-job kit: flags derived from configs, one registry, pure modules without Beam."""

import argparse
import dataclasses
import enum
import importlib
import subprocess
import sys
from typing import Literal

import pytest

import pipelines
from schemas import flags
from pipelines.kit import progress
from pipelines.kit.buckets import Bucket, Count
from pipelines.kit.packed_writer import ALL_BUCKETS, bucket_counts, route
from pipelines.kit.output import OutputConfig, recorded
from schemas.raw import DeadLetter

JOBS = {name: importlib.import_module(module).JOB for name, module in pipelines.JOBS.items()}


def _parser(job):
    parser = argparse.ArgumentParser(prog=job.name, exit_on_error=False)
    flags.add_flags(parser, job.config, renames=job.renames)
    return parser


def _leaves(cls):
    for f in dataclasses.fields(cls):
        kind = flags.typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            yield from ((f"{f.name}.{path}", leaf) for path, leaf in _leaves(kind))
        else:
            yield f.name, f


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_registered_job_is_named_as_registered_and_documents_every_flag(name):
    job = JOBS[name]
    assert job.name == name and dataclasses.is_dataclass(job.config)
    actions = [a for a in _parser(job)._actions if a.option_strings and a.dest != "help"]
    assert actions and all(a.help and not a.help.startswith(a.dest.split(".")[-1].replace("_", " ")) for a in actions)
    dests = {a.dest for a in actions}
    off_cli = {path for path, flag in job.renames.items() if flag is None}
    assert dests | off_cli == {path for path, _ in _leaves(job.config)}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_defaults_on_the_command_line_are_the_config_defaults(name, tmp_path):
    job = JOBS[name]
    required = ["--input", "in.jsonl", "--tokenizer", "t.model", "--output", str(tmp_path), "--seq-len", "512"]
    if "vqgan" in {f.name for f in dataclasses.fields(job.config)}:
        required += ["--vqgan", "v"]
    config = flags.from_args(job.config, _parser(job).parse_args(required))
    kwargs = dict(inputs=("in.jsonl",), tokenizer="t.model", output=OutputConfig(str(tmp_path), (Bucket(512),)))
    if "vqgan" in kwargs or "--vqgan" in required:
        kwargs["vqgan"] = "v"
    assert config == job.config(**kwargs)


@dataclasses.dataclass(frozen=True)
class _Inner:
    on: bool = True
    """Keep it on."""
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class _Outer:
    """An example config.

    limit: at most this many
      (a continued entry).
    """

    size: int
    """How big."""
    inner: _Inner = _Inner()
    limit: float | None = 2.5
    names: tuple[str, ...] = ("x",)


def test_flags_follow_types_defaults_and_docs():
    parser = argparse.ArgumentParser(exit_on_error=False)
    flags.add_flags(parser, _Outer)
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(by_flag) == {"--size", "--no-on", "--mode", "--limit", "--names"}
    assert by_flag["--size"].required and by_flag["--size"].help == "How big."
    assert by_flag["--limit"].help == "at most this many (a continued entry). ('none' unsets it) (default: 2.5)"
    assert by_flag["--mode"].choices == ("a", "b")
    args = parser.parse_args(["--size", "3", "--no-on", "--mode", "b", "--limit", "none", "--names", "p", "q"])
    assert flags.from_args(_Outer, args) == _Outer(3, _Inner(False, "b"), None, ("p", "q"))
    assert flags.from_args(_Outer, parser.parse_args(["--size", "1"])) == _Outer(1)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--size", "1", "--mode", "c"])
    with pytest.raises(ValueError, match="^--limit much: could not convert"):
        flags.from_args(_Outer, parser.parse_args(["--size", "1", "--limit", "much"]))


def test_two_fields_with_one_flag_name_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        inner: _Inner = _Inner()
        mode: str = "x"

    with pytest.raises(TypeError, match="--mode"):
        flags.add_flags(argparse.ArgumentParser(), Clash)


def test_routing_counts_with_typed_names_and_dead_letters():
    buckets = (Bucket(4, 0, 6), Bucket(8, 6), Bucket(16, 6))
    fit = lambda b: DeadLetter("d", "too_long", "", "s") if b.seq_len == 16 else ["piece"] * (b.seq_len // 4)
    outputs = list(route(10, buckets, fit))
    main = [o for o in outputs if not hasattr(o, "tag")]
    tagged = [(o.tag, o.value) for o in outputs if hasattr(o, "tag")]
    assert main == [(8, "piece"), (8, "piece")]
    assert tagged[:3] == [("counts", ((4, "too_long"), 1)), ("counts", ((8, "documents"), 1)),
                          ("counts", ((8, "segments"), 2))]
    assert tagged[3][0] == "dead_letters" and tagged[3][1][0] == 16
    assert {c.value for c in Count} == {"documents", "segments", "too_short", "too_long"}


def test_bucket_counts_sum_per_bucket_and_job_wide_and_refuse_undeclared_names():
    class JobCount(str, enum.Enum):
        PAIRS = "pairs"

    counts = [((8, "documents"), 2), ((ALL_BUCKETS, "pairs"), 5), ((16, "documents"), 7), ((8, "documents"), 1)]
    assert bucket_counts(counts, Bucket(8), (Count, JobCount)) == {
        "documents": 3, "segments": 0, "too_short": 0, "too_long": 0, "pairs": 5}
    with pytest.raises(ValueError, match=r"\['pairs'\] are not declared"):
        bucket_counts(counts, Bucket(8), (Count,))


def test_the_manifest_records_what_a_dataset_is_not_where_it_lives():
    output = OutputConfig("/somewhere", (Bucket(512), Bucket(1024, 10, 20)), overwrite=True)
    assert recorded(output) == {"buckets": ["512", "1024:10-20"], "name": "", "pack_groups": 16, "shard_mb": 256,
                                "num_shards": None}


def test_pure_modules_import_no_beam_and_no_array_record():
    modules = ["pipelines", "pipelines.kit.naming", "pipelines.kit.output", "schemas.flags", "pipelines.kit.buckets",
               "pipelines.kit.packing", "pipelines.tokens.vision_layout", "pipelines.kit.progress", "schemas.manifest",
               "schemas.storage", "schemas.packed"]
    code = (f"import sys; import {', '.join(modules)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'array_record')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_data_job_help_shows_defaults(capsys):
    from orchestration import cli

    with pytest.raises(SystemExit):
        cli.main(["data", "books", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--pack-groups PACK_GROUPS Hash groups per bucket, each packed on its own" in out
    assert "(default: 16)" in out and "(default: 256)" in out and "--dry-run" in out


def test_progress_line_has_counts_elapsed_and_eta():
    counts = progress.collections.Counter(files=1, input_bytes=250, documents=12345, tokens=3456789)
    assert progress.line(counts, 62.0, 1000, 4) == (
        "progress: 1/4 files (25% of input bytes), 12,345 documents, 3,456,789 tokens, 0:01:02 elapsed, ETA 0:03:06")


@pytest.mark.parametrize("verbosity, shown", [([], True), (["-q"], False)])
def test_jobs_show_progress_unless_quiet(verbosity, shown, sample_books, tokenizer_path, tmp_path, monkeypatch, capsys):
    from orchestration import cli

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    argv = ["data", "books", "--input", str(sample_books), "--output", str(tmp_path), "--tokenizer", tokenizer_path,
            "--seq-len", "512", *verbosity]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert ("progress: 1/1 files (100% of input bytes), 60 documents" in err) == shown
    assert ("progress: 0/1 files" in err) == shown


def _job_argv(name, tmp_path, sample_books, tokenizer_path, output):
    argv = ["data", name, "--input", str(sample_books), "--output", output, "--tokenizer", tokenizer_path,
            "--seq-len", "1024"]
    if "vqgan" in {f.name for f in dataclasses.fields(JOBS[name].config)}:
        vqgan = tmp_path / "vqgan"
        vqgan.mkdir(exist_ok=True)
        for file in ("config.json", "params.safetensors"):
            (vqgan / file).write_text("{}")  # read for its sha256 only: a dry run encodes nothing
        argv += ["--vqgan", str(vqgan)]
    return argv


def test_a_local_dry_run_prints_options_and_stages_and_writes_nothing(sample_books, tokenizer_path, tmp_path, capsys):
    from orchestration import cli

    argv = _job_argv("books", tmp_path, sample_books, tokenizer_path, str(tmp_path / "out"))
    assert cli.main(argv + ["--dry-run", "--direct_num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "  --direct_num_workers=2" in out and "  --runner=FnApiRunner" in out
    assert "\n  ReadInputs\n" in out and "    WriteDatasets/WriteManifests\n" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n if n == "books" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(JOBS)])
def test_dataflow_builds_each_jobs_description_offline(name, sample_books, tokenizer_path, tmp_path, capsys):
    from orchestration import cli

    argv = _job_argv(name, tmp_path, sample_books, tokenizer_path, "gs://lwm-test-bucket/out")
    beam = ["--runner", "DataflowRunner", "--project", "lwm-test", "--region", "us-central1",
            "--temp_location", "gs://lwm-test-bucket/tmp"]
    assert cli.main(argv + ["--dry-run"] + beam) == 0
    out = capsys.readouterr().out
    assert "  --runner=DataflowRunner" in out and "  --setup_file=" in out and "\n  WriteDatasets\n" in out
    assert "(JOB_TYPE_BATCH):" in out and "transforms in its portable pipeline" in out
