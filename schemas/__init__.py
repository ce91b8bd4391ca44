"""Record formats and the configs around them: the bottom layer, importing no other project package.

Raw inputs (``raw``, ``raw_vision``), the packed training example (``packed``), the
shard manifest (``manifest``), the vocabulary layout (``vocab``), typed configs from
mappings (``typed_config``) and from command-line flags (``flags``), and file access
on local disks and object stores (``storage``).

Layering of the project, lowest first; a module imports only from its own layer
or lower ones (``tests/test_architecture.py`` checks it, imports inside functions
included):

1. ``schemas``;
2. ``pipelines.tokens``: text and media to token ids, LWM's prompt layouts (no Beam);
3. ``trainer``: model, training, inference, evaluation, conversions;
4. ``pipelines.kit``: the Beam data-job kit;
5. the data jobs (``pipelines.books``, ``pipelines.vision``, ``pipelines.chat_qa``);
6. ``orchestration``: the ``lwm`` CLI, stage plans, launchers and the demo.

The tokenizers sit below the trainer so that inference (vision chat, video
evaluation) encodes media with the data jobs' own code; the data jobs sit above
the trainer so that a checkpoint can generate their data (the ``lwm:`` QA
generator). Nothing below imports what is above it.
"""
