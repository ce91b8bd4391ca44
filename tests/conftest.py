"""Test configuration: CPU JAX with 8 simulated devices, set before JAX is imported."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()


@pytest.fixture(scope="session")
def sample_books(tmp_path_factory) -> pathlib.Path:
    """A JSON-lines file of 60 synthetic books (the demo's generator)."""
    from trainer.evaluation.synthetic_books import write_books

    return write_books(tmp_path_factory.mktemp("books") / "books.jsonl", 60)


@pytest.fixture(scope="session")
def tokenizer_path(sample_books, tmp_path_factory) -> str:
    """A 512-piece SentencePiece model trained on ``sample_books``."""
    from pipelines.tokens import text_tokenizer
    from schemas import raw

    with open(sample_books, "rb") as stream:
        texts = [d.text for d in raw.iter_documents(stream, str(sample_books))]
    return text_tokenizer.train(texts, 512, str(tmp_path_factory.mktemp("tokenizer") / "tok.model"))


@pytest.fixture(scope="session")
def books_dataset(sample_books, tokenizer_path, tmp_path_factory) -> pathlib.Path:
    """``lwm data books`` output for ``sample_books`` at seq_len 512: the dataset directory."""
    from pipelines import books
    from pipelines.kit.buckets import Bucket
    from pipelines.kit.output import OutputConfig
    from pipelines.kit.beam_runner import pipeline_options

    output = tmp_path_factory.mktemp("dataset")
    config = books.BooksConfig(
        inputs=(str(sample_books),), tokenizer=tokenizer_path, output=OutputConfig(str(output), (Bucket(512),), num_shards=2)
    )
    books.run(config, pipeline_options([]))
    return output / "seq512"


@pytest.fixture(scope="session")
def vqgan_dir(tmp_path_factory) -> pathlib.Path:
    """A randomly initialised small VQGAN (the demo's), saved: the vision jobs' ``--vqgan``."""
    from pipelines.tokens.vqgan import SMALL, VQGAN

    path = tmp_path_factory.mktemp("vqgan") / "small"
    VQGAN.init_random(SMALL, seed=0).save(str(path))
    return path
