"""Peak memory of ``lwm convert lwm-import`` against the model's size: the params file is read as a stream.

Writes an LWM streaming params file (per-layer layout, many tensors, the file several
times larger than its largest tensor), then imports it while a thread samples this
process's resident memory every few milliseconds. Reports the peak above the resident
memory before the import, for the read alone (``read_params``) and for the whole
import (read, then the orbax checkpoint write), each as a multiple of the model's bytes.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/lwm_import_memory.py [--d-model 1024] [--layers 8] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from trainer.convert import lwm_release, lwm_streaming  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Samples resident memory in a thread; ``peak`` is the most seen since ``__enter__``."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def records(config: ModelConfig, dtype):
    """LWM's records of a random model, one tensor at a time (never the whole model in memory)."""
    rng = np.random.default_rng(0)
    c = config
    d, f = c.d_model, c.mlp_dim

    def w(*shape):
        return rng.standard_normal(shape, np.float32).astype(dtype)

    yield ("transformer", "wte", "embedding"), w(c.vocab_size, d)
    yield ("transformer", "vte", "embedding"), w(c.vision_vocab_size, d)
    for i in range(c.num_layers):
        for name, shape in (("attention/wq", (d, d)), ("attention/wk", (d, d)), ("attention/wv", (d, d)),
                            ("attention/wo", (d, d)), ("feed_forward/w1", (d, f)), ("feed_forward/w3", (d, f)),
                            ("feed_forward/w2", (f, d)), ("attention_norm", (d,)), ("ffn_norm", (d,))):
            yield ("transformer", "h", str(i), *name.split("/"), "kernel"), w(*shape)
    yield ("transformer", "ln_f", "kernel"), w(d)
    yield ("lm_head", "kernel"), w(d, c.vocab_size)
    yield ("vision_head", "kernel"), w(d, c.vision_vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = dataclasses.replace(lwm_release.get_preset("lwm-chat-32k"), d_model=args.d_model, num_heads=8,
                                 num_kv_heads=8, num_layers=args.layers, mlp_dim=args.d_model * 11 // 4)
    dtype = ml_dtypes.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "params")
        lwm_streaming.write_records(path, records(config, dtype))
        largest = max(config.vocab_size, config.mlp_dim * 3) * config.d_model * 2
        model_bytes = config.num_params() * 2
        # Warm-up: compile and import the checkpoint writer's code paths on a tiny file first.
        tiny = dataclasses.replace(config, d_model=64, num_heads=8, num_kv_heads=8, num_layers=1, mlp_dim=128,
                                   vocab_size=64, vision_vocab_size=64)
        lwm_streaming.write_records(os.path.join(tmp, "tiny"), records(tiny, dtype))
        lwm_release.import_release(os.path.join(tmp, "tiny"), tiny, os.path.join(tmp, "warm"))
        with PeakRss() as read:
            params, _ = lwm_release.read_params(path, config)
        del params
        with PeakRss() as whole:
            lwm_release.import_release(path, config, os.path.join(tmp, "out"))
        result = {
            "file_bytes": os.path.getsize(path), "model_bytes": model_bytes, "largest_tensor_bytes": largest,
            "read_peak_bytes": read.peak - read.start, "import_peak_bytes": whole.peak - whole.start,
            "read_peak_over_model": round((read.peak - read.start) / model_bytes, 3),
            "import_peak_over_model": round((whole.peak - whole.start) / model_bytes, 3),
        }
    if args.json:
        print(json.dumps(result))
        return
    mb = 2**20
    print(f"params file {result['file_bytes'] / mb:.0f} MiB ({result['file_bytes'] / largest:.1f}x its largest "
          f"tensor, {largest / mb:.0f} MiB); model {model_bytes / mb:.0f} MiB (bf16)")
    print(f"peak above the start: read {result['read_peak_bytes'] / mb:.0f} MiB "
          f"({result['read_peak_over_model']}x the model), whole import {result['import_peak_bytes'] / mb:.0f} MiB "
          f"({result['import_peak_over_model']}x)")


if __name__ == "__main__":
    main()
