"""Beam data jobs, the kit they are built with, and the tokenizers they share with the trainer.

- ``pipelines.tokens``: text and media → token ids and LWM's prompt layouts. No Beam;
  the trainer imports it too (layer 2 of the order in :mod:`schemas`).
- ``pipelines.kit``: the data-job kit (reading, routing into length buckets,
  packing, shards and manifests, the runner, progress). It may import the
  tokenizers and the trainer, never a job.
- the jobs, one place per family: ``books`` (a module), ``vision`` (image-text,
  video-text and video-needle exercises), ``chat_qa`` (long-context QA and its generators), ``lwm_jsonl`` (data
  prepared for LWM's own trainer, a module). A job may import
  the kit, the tokenizers and the trainer, never another family.
- :data:`JOBS` below is the one list of jobs: ``lwm data``, stage plans and their
  checks read it. This module imports nothing, so reading it costs nothing.

Adding a data job
=================

A data job is one module (in its family's place) and one line in :data:`JOBS`. The module defines:

- a frozen config dataclass holding every setting of the job, each documented by a
  docstring under the field. It embeds the shared output side as
  ``output: OutputConfig`` (:mod:`pipelines.kit.output`: output directory, length
  buckets or ``--seq-len``, shard size or count, pack groups, ``--overwrite``).
  ``lwm data NAME`` derives its flags from it (:mod:`schemas.flags`): names,
  types, defaults and help come from the fields, nothing is restated in argparse;
- ``check(config)``: raise ``ValueError`` naming any input that is missing or wrong
  (:func:`pipelines.kit.job.check_tokenizer` loads a tokenizer), and return
  :func:`pipelines.kit.job.check_inputs` (the input globs' file count and bytes, for
  progress). It runs before any output is touched;
- ``build(pipeline, config)``: the job's front half, ending in the shared back
  half. Read with :class:`pipelines.kit.sources.ReadUnique` (inputs → unique valid
  records + dead letters), turn records into :class:`pipelines.kit.packing.Segment`
  values, route them with :func:`pipelines.kit.packed_writer.route` (which buckets, cut or
  dead-letter, typed :class:`pipelines.kit.buckets.Count` counts), and hand the four
  PCollections to :class:`pipelines.kit.packed_writer.WritePackedDatasets` with a
  :class:`~pipelines.kit.packed_writer.DatasetSpec` (packing, shards, dead letters and the
  manifest, written to ``config.output.output``);
- ``JOB = Job(NAME, Config, build, check, help=...)`` and ``run = JOB.run``, so a
  notebook runs it as ``pipelines.books.run(config, beam_options)``.

What the kit does around ``build`` (:func:`pipelines.kit.job.run`): checks inputs and
the output's writability, refuses existing output without ``--overwrite`` and with
it builds beside the old datasets and swaps them in at the end, runs the pipeline on
any Beam runner, prints progress, describes the job graph for ``--dry-run``, and
returns the manifests. Names a job writes (bucket directories, staging, shard names,
``manifest.json``, the dead-letter file) come from :mod:`pipelines.kit.naming` and
:mod:`schemas.manifest`; transforms stay pure functions that tests call directly.
"""

# ``lwm data NAME`` → the module defining the job's ``JOB``: registering a job is one line here.
JOBS = {
    "books": "pipelines.books",
    "image-text": "pipelines.vision.image_text",
    "video-text": "pipelines.vision.video_text",
    "video-needle": "pipelines.vision.needle_exercises",
    "chat-qa": "pipelines.chat_qa.pipeline",
    "lwm-jsonl": "pipelines.lwm_jsonl",
}
