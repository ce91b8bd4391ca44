# The image the gke backend runs (`lwm stages run PLAN --backend gke --image IMAGE`): lwm with
# JAX for TPUs (the `tpu` extra) and gs:// support (the `gcp` extra), `lwm` on PATH as the
# container's command. Build and push it where the cluster can pull from, e.g.
#
#   docker build -t us-docker.pkg.dev/PROJECT/lwm/lwm:0.1.0 .
#   docker push us-docker.pkg.dev/PROJECT/lwm/lwm:0.1.0
#
# For GPUs (SLURM with containers) build with --build-arg EXTRAS=gpu,gcp.
FROM python:3.11-slim

ARG EXTRAS=tpu,gcp
# ffmpeg: the video pipelines and video evaluation decode and encode with it.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lwm
COPY setup.cfg pyproject.toml README.md ./
COPY schemas schemas
COPY pipelines pipelines
COPY trainer trainer
COPY orchestration orchestration
COPY configs configs
RUN pip install --no-cache-dir ".[${EXTRAS}]"

# Plans are mounted (the gke backend's ConfigMap at /etc/lwm-stages); run_root and data are gs:// or mounts.
WORKDIR /workspace
ENTRYPOINT []
CMD ["lwm", "--help"]
