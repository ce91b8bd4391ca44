"""Beam data jobs and the pure transforms they are made of; text and vision tokenizers.

Adding a data job
=================

A data job is one module here and one line in :data:`JOBS`. The module defines:

- a frozen config dataclass holding every setting of the job, each documented by a
  docstring under the field. It embeds the shared output side as
  ``output: OutputConfig`` (:mod:`pipelines.output`: output directory, length
  buckets or ``--seq-len``, shard size or count, pack groups, ``--overwrite``).
  ``lwm data NAME`` derives its flags from it (:mod:`pipelines.flags`): names,
  types, defaults and help come from the fields, nothing is restated in argparse;
- ``check(config)``: raise ``ValueError`` naming any input that is missing or wrong
  (:func:`pipelines.job.check_tokenizer` loads a tokenizer), and return
  :func:`pipelines.job.check_inputs` (the input globs' file count and bytes, for
  progress). It runs before any output is touched;
- ``build(pipeline, config)``: the job's front half, ending in the shared back
  half. Read with :class:`pipelines.sources.ReadUnique` (inputs → unique valid
  records + dead letters), turn records into :class:`pipelines.packing.Segment`
  values, route them with :func:`pipelines.dataset.route` (which buckets, cut or
  dead-letter, typed :class:`pipelines.buckets.Count` counts), and hand the four
  PCollections to :class:`pipelines.dataset.WritePackedDatasets` with a
  :class:`~pipelines.dataset.DatasetSpec` (packing, shards, dead letters and the
  manifest, written to ``config.output.output``);
- ``JOB = Job(NAME, Config, build, check, help=...)`` and ``run = JOB.run``, so a
  notebook runs it as ``pipelines.books.run(config, beam_options)``.

What the kit does around ``build`` (:func:`pipelines.job.run`): checks inputs and
the output's writability, refuses existing output without ``--overwrite`` and with
it builds beside the old datasets and swaps them in at the end, runs the pipeline on
any Beam runner, prints progress, describes the job graph for ``--dry-run``, and
returns the manifests. Names a job writes (bucket directories, staging, shard names,
``manifest.json``, the dead-letter file) come from :mod:`pipelines.naming` and
:mod:`schemas.manifest`; transforms stay pure functions that tests call directly.
"""

# ``lwm data NAME`` → the module defining the job's ``JOB``: registering a job is one line here.
JOBS = {
    "books": "pipelines.books",
    "image-text": "pipelines.image_text",
    "video-text": "pipelines.video_text",
    "chat-qa": "pipelines.chat_qa",
}
