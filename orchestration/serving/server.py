"""``lwm serve``: a checkpoint behind the OpenAI API, run by uvicorn; SIGTERM drains before it exits.

Steps: :func:`build_service` checks every input (checkpoint, tokenizer, VQGAN, the
key's variable, the media directory) and loads the checkpoint onto ``sp`` devices
with the engine's cache; :func:`serve` runs the app with uvicorn on ``host:port``
(127.0.0.1 unless told otherwise). On SIGTERM the server stops accepting work
(503 to anything new), lets the requests in flight finish, then exits 0; a second
SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time

import uvicorn

from orchestration.serving import conversation
from orchestration.serving.http_app import Service, create_app
from trainer.inference.engine import Engine, EngineConfig
from trainer.inference.sampler import open_checked

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything ``lwm serve`` takes; the flags of the same names."""

    ckpt: str
    tokenizer: str
    step: int | None = None
    vqgan: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    sp: int = 1
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None
    prefix_cache: int = 16
    max_frames: int = 8
    max_body_mb: float = 16.0
    api_key_env: str | None = None
    media_dir: str | None = None
    served_name: str | None = None


def default_name(ckpt: str) -> str:
    """The checkpoint's run name (the directory above ``checkpoints/``), without ``@`` or ``:`` so that
    ``openai:NAME@URL`` can name it."""
    path = os.path.abspath(ckpt).rstrip(os.sep)
    if os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    return re.sub(r"[@:\s]", "-", os.path.basename(path)) or "lwm"


def build_service(config: ServeConfig) -> Service:
    """The checked inputs, the loaded checkpoint and its engine, ready for :func:`create_app`."""
    name = config.served_name or default_name(config.ckpt)
    if "@" in name or ":" in name:
        raise ValueError(f"--served-name {name!r} must contain neither '@' nor ':' (openai:NAME@URL names it)")
    key = None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is empty or unset")
    if config.media_dir is not None and not os.path.isdir(config.media_dir):
        raise ValueError(f"--media-dir {config.media_dir}: not a directory")
    if config.max_body_mb <= 0 or config.max_frames < 1:
        raise ValueError("--max-body-mb must be > 0 and --max-frames >= 1")
    vqgan = None
    if config.vqgan:
        from pipelines.tokens.vqgan import VQGAN

        vqgan = VQGAN.load(config.vqgan)
    tokenizer, sampler = open_checked(config.ckpt, config.tokenizer, step=config.step, sp=config.sp)
    engine = Engine(sampler, EngineConfig(config.max_batch, config.max_context, config.max_queue, config.prefix_cache))
    policy = conversation.MediaPolicy(vqgan, bool(sampler.config.vision_vocab_size), config.media_dir,
                                      config.max_frames)
    return Service(tokenizer, engine, name, policy, key, int(config.max_body_mb * 2**20))


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM drains: new requests get 503 until the service is idle, then it exits."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        if sig != signal.SIGTERM or self.service.draining:
            return super().handle_exit(sig, frame)
        log.warning("SIGTERM: finishing %d request(s), refusing new ones", self.service.engine.busy())
        self.service.draining = True
        threading.Thread(target=self._exit_when_idle, name="lwm-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        while not self.service.idle():
            time.sleep(0.05)
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    """Builds the service and serves it until SIGTERM (drained) or Ctrl-C; 0 after a drain."""
    service = build_service(config)
    app = create_app(service)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=30), service)
    print(f"lwm serve: {service.served_name} at http://{config.host}:{config.port}/v1 "
          f"(batch {config.max_batch}, context {service.engine.context} tokens)", flush=True)
    try:
        server.run()
    finally:
        service.engine.close()
    return 0
