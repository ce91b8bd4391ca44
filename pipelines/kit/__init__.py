"""The data-job kit: what every Beam data job is built from, so a job is one module.

- ``job``: the job contract (config, ``check``, ``build``) and running it safely
  (input checks, staging beside old output, dry runs, progress);
- ``sources``: reading inputs into unique valid records and dead letters;
- ``buckets``, ``packing``, ``packed_writer``: length buckets, best-fit packing and
  the writer of packed ArrayRecord datasets with their manifests;
- ``output``, ``naming``: the shared output options and every name a job writes;
- ``beam_runner``, ``progress``: the local Beam runner set-up and progress lines;
- ``inspection``: ``lwm data inspect``.

The kit imports :mod:`schemas` and :mod:`pipelines.tokens`; jobs import the kit,
never the reverse.
"""
