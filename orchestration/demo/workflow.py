"""``lwm demo``: the whole workflow on embedded sample data, on CPU, with no downloads.

Each step is a function of the demo's working directory that calls the same
library code (or CLI) a user would; later steps read what earlier ones wrote.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

from orchestration import cli
from trainer.evaluation import synthetic_books as sample_data
from trainer.evaluation import synthetic_videos as sample_media

PLAN = pathlib.Path(__file__).resolve().parents[2] / "configs" / "stages" / "demo.yaml"


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _lwm(*argv: str) -> None:
    print("$ lwm " + " ".join(argv), flush=True)
    code = cli.main(list(argv))
    if code:
        raise SystemExit(f"demo step failed: lwm {' '.join(argv)} exited {code}")


def planned_job(dataset: str):
    """The plan's ``lwm data`` job for ``dataset`` (a ``DataJob``): the plan's ``datasets:`` section is the
    one place the demo's data settings are written."""
    from orchestration.stages.datasets import job_for
    from orchestration.stages.plan import load

    job = job_for(load(PLAN), dataset)
    if job is None:
        raise SystemExit(f"demo: {PLAN} declares no dataset {dataset}")
    return job


def _run_job(workdir: pathlib.Path, job) -> None:
    """``job`` in ``workdir``, which the plan's paths are relative to."""
    import contextlib

    with contextlib.chdir(workdir):
        print(f"$ cd {workdir}", flush=True)
        _lwm(*job.argv(overwrite=True))


def _lwm_data(workdir: pathlib.Path, dataset: str) -> None:
    _run_job(workdir, planned_job(dataset))


def books(workdir: pathlib.Path) -> None:
    _banner("sample books → tokenizer → packed shards")
    corpus = sample_data.write_books(workdir / "raw" / "books.jsonl", 200)
    print(f"wrote {corpus} (200 synthetic books)")
    _lwm("tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--output", str(workdir / "tokenizer.model"))
    _lwm_data(workdir, "data/books/seq512")  # one job writes every length bucket
    _lwm("data", "inspect", str(workdir / "data" / "books" / "seq1024"))


def vision(workdir: pathlib.Path) -> None:
    """Generated images and videos → a random small VQGAN → image-text and video-text datasets.

    No weights can be downloaded here, so the VQGAN is randomly initialised (its codes
    are deterministic but meaningless); with real aMUSEd weights from
    ``lwm convert vqgan-import`` the same commands give LWM's vision tokens.
    """
    from pipelines.tokens.vqgan import SMALL, VQGAN

    _banner("generated images and videos → small random VQGAN → vision-language packed shards")
    images = sample_media.write_image_text(workdir / "raw" / "image_text", 24)
    videos = sample_media.write_video_text(workdir / "raw" / "video_text", 16, frames=(4, 16))
    print(f"wrote {images} (24 captioned shapes) and {videos} (16 captioned moving shapes, 0.5-2 s)")
    vqgan = workdir / "vqgan_small_random"
    VQGAN.init_random(SMALL, seed=0).save(str(vqgan))
    print(f"saved a randomly initialised small VQGAN to {vqgan}")
    _lwm_data(workdir, "data/image_text/seq1024")
    _lwm_data(workdir, "data/video_text/seq2048")
    _lwm("data", "inspect", str(workdir / "data" / "video_text" / "seq2048"))
    # The video needle's training exercises: frames of the same clips with a needle picture among
    # them, the eval's question, loss on the answer (the eval draws other clips and seeds).
    _lwm_data(workdir, "data/video_needle/seq1024")


def chat_qa(workdir: pathlib.Path) -> None:
    """The demo books → long-context chat QA (extractive questions, no model) → ``data/chat_qa/seq1024``.

    Contexts of adjacent ~200-token chunks fill the demo's 1024-token sequences, each
    followed by one question per chunk, loss on the answers only; pairs are cached in
    ``data/chat_qa/qa_cache``, so a second demo run generates none.
    """
    _banner("demo books → chat QA: contexts of adjacent chunks + extractive questions, loss on answers")
    _lwm_data(workdir, "data/chat_qa/seq1024")
    _lwm("data", "inspect", str(workdir / "data" / "chat_qa" / "seq1024"))


def train(workdir: pathlib.Path) -> None:
    """The stage plan ``configs/stages/demo.yaml``: copying and retrieval on needle exercises, then
    512 → 1024 (books + retrieval + image-text) → 2048 tokens (books + video-text), RoPE theta 1e4 →
    2e4 → 5e4, then a chat stage on book QA and one on video needle exercises, each stage from the previous
    one's final params; then its status table.

    The plan's paths are relative to the workdir, so the commands run there. Each stage
    trains in a child process that simulates the CPU devices of its own mesh (8 for fsdp 2 ×
    sp 4, 1 for the copying warm-up): any device count in ``XLA_FLAGS`` is dropped, since a
    count there would be every stage's.
    """
    import contextlib
    import os
    import shutil

    _banner("stage plan: a copying warm-up on needle exercises (1 device), then 512 → 1024 → 2048 tokens with growing "
            "RoPE theta (ring attention over sp=4), then chat QA, then video needle exercises")
    shutil.rmtree(workdir / "runs" / "stages", ignore_errors=True)  # a fresh plan each demo, not a resume
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.chdir(workdir):
            print(f"$ cd {workdir}")
            _lwm("stages", "data", str(PLAN))  # the books step made every dataset: all skipped
            _lwm("stages", "run", str(PLAN))
            _lwm("stages", "status", str(PLAN))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    print(f"each stage's checkpoints, metrics.jsonl, TensorBoard events and lineage.json are in "
          f"{workdir / 'runs' / 'stages'}/STAGE")


@dataclasses.dataclass(frozen=True)
class Exercises:
    """A set of needle exercises: how many, haystack tokens (needle included), digits of the numbers, data seed."""

    count: int
    lengths: tuple[int, int]
    digits: tuple[int, int]
    seed: int


EXERCISES = {  # the demo's sets, by dataset name under data/
    # stage retrieval-1024, then mixed into later stages: haystacks up to a row of 1024, the eval's 7 digits
    "retrieval": Exercises(3000, (64, 900), (7, 7), seed=1),
    # the copying warm-up (copy-1024, about one epoch): a needle and a few words of book around it, numbers
    # of 1-7 digits (one digit is copied before seven are)
    "retrieval_warmup": Exercises(12000, (1, 40), (1, 7), seed=2),
}
NEEDLE_LENGTHS = "512,1024,1536,2048"


@dataclasses.dataclass(frozen=True)
class VideoNeedle:
    """The demo's video needle: exercises to train on, and the eval's frame counts, depths and haystack."""

    frames: str  # frames per eval prompt (the needle one of them), as the plan's exercises have
    depths: str
    rounds: int
    haystack_clips: int  # the eval's own moving-shape clips (another seed than the training clips)


VIDEO_NEEDLE = VideoNeedle(frames="2,3", depths="0,0.5,1", rounds=4, haystack_clips=4)


def retrieval_data(workdir: pathlib.Path) -> None:
    """The demo's needle exercises (:data:`EXERCISES`), from the demo books (other cities and numbers than
    the eval's): haystacks with a needle (``orchestration.demo.sample_retrieval``) written to
    ``raw/{name}.jsonl``, turned by the plan's ``lwm data chat-qa --generator needle`` into the eval's prompt
    and answer with loss on the answer only, packed into ``data/{name}/seq1024``."""
    _banner("synthetic needle-retrieval exercises from the books → chat QA in the eval's words, loss on answers")
    for name in EXERCISES:
        write_exercises(workdir, name)


def write_exercises(workdir: pathlib.Path, name: str, seed: int | None = None) -> pathlib.Path:
    """Exercise set ``name`` as :func:`retrieval_data` makes it; with another data ``seed``, named
    ``{name}_{seed}`` (raw file, dataset and cache) beside it. Returns the packed dataset's directory."""
    from orchestration.demo.sample_retrieval import write_retrieval

    exercises = EXERCISES[name]
    label = name if seed is None else f"{name}_{seed}"
    corpus = write_retrieval(workdir / "raw" / f"{label}.jsonl", workdir / "raw" / "books.jsonl",
                             str(workdir / "tokenizer.model"), exercises.count,
                             seed=exercises.seed if seed is None else seed, min_length=exercises.lengths[0],
                             max_length=exercises.lengths[1], digits=exercises.digits)
    print(f"wrote {corpus} ({exercises.count} haystacks of up to {exercises.lengths[1]} tokens with a needle each)")
    job = planned_job(f"data/{name}/seq1024")
    config = dataclasses.replace(job.config, inputs=(f"raw/{label}.jsonl",), cache=f"data/{label}/qa_cache",
                                 output=dataclasses.replace(job.config.output, output=f"data/{label}"))
    _run_job(workdir, dataclasses.replace(job, config=config, outputs=(f"data/{label}/seq1024",)))
    return workdir / "data" / label / "seq1024"


def needle(workdir: pathlib.Path) -> None:
    """``lwm eval needle`` on the demo's final checkpoint at 512–2048 tokens, all depths: the table
    and the heatmap's path."""
    _banner("needle in a haystack: the demo model's retrieval accuracy, context length × depth")
    _lwm("eval", "needle", "--ckpt", str(workdir / "runs" / "stages" / "chat-1024"),
         "--tokenizer", str(workdir / "tokenizer.model"),
         "--lengths", NEEDLE_LENGTHS, "--depths", "0,0.25,0.5,0.75,1", "--rounds", "2",
         "--out", str(workdir / "needle"))


def video_needle(workdir: pathlib.Path) -> None:
    """``lwm eval video-needle`` on the demo's last stage (``video-needle-1024``): a needle picture among
    frames of moving-shape clips the demo writes for it (not the training clips), lettered options; the
    table and the heatmap's path. Chance is 1 / 4."""
    _banner("video needle in a haystack: the demo model's answers, frames × depth (chance 25%)")
    haystack = sample_media.write_video_text(workdir / "raw" / "video_needle_haystack", VIDEO_NEEDLE.haystack_clips,
                                             seed=7, frames=8, fps=8)
    clips = [str(haystack.parent / json.loads(line)["path"]) for line in haystack.read_text().splitlines()]
    _lwm("eval", "video-needle", "--ckpt", str(workdir / "runs" / "stages" / "video-needle-1024"),
         "--tokenizer", str(workdir / "tokenizer.model"), "--vqgan", str(workdir / "vqgan_small_random"),
         "--frames", VIDEO_NEEDLE.frames, "--depths", VIDEO_NEEDLE.depths, "--rounds", str(VIDEO_NEEDLE.rounds),
         "--max-tokens", "12", "--haystack-videos", *clips, "--out", str(workdir / "video_needle"))


STEPS: tuple[Callable[[pathlib.Path], None], ...] = (books, retrieval_data, vision, chat_qa, train, needle, video_needle)


def run(workdir: str) -> None:
    root = pathlib.Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for step in STEPS:
        step(root)
    print(f"\ndemo finished in {time.time() - start:.0f}s; everything is under {root}")
