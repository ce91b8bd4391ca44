"""Stage plans: several training stages, their data jobs and where they run, as one command.

- ``plan``: the plan file (``configs/stages/*.yaml``), parsed by ``trainer.config``'s
  typed code, and its checks (parents, mesh, batch, data);
- ``datasets``: each stage's data checked before it starts, and the ``lwm data`` jobs
  that produce missing data;
- ``lineage``: ``RUN_DIR/lineage.json``, what a stage was made from;
- ``stage_runner``: runs the stages in order, skipping finished ones and resuming interrupted ones;
- ``gates``: held-out loss and needle checks after a stage, and the gates on them;
- ``status``: the table of ``lwm stages status``;
- ``local``, ``tpu_vm``, ``gke``, ``slurm``: the backends.
"""
