"""``lwm data inspect``: a readable view of a packed dataset (manifest summary + one record)."""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
from apache_beam.io.filesystems import FileSystems
from array_record.python.array_record_module import ArrayRecordReader

from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import manifest as manifest_lib
from schemas import packed, storage, vocab


def summary(directory: str, manifest: manifest_lib.Manifest) -> str:
    counts = manifest.counts
    total = manifest.tokens + manifest.pad_tokens
    lines = [
        f"dataset   {directory}",
        f"job       {manifest.job} ({manifest.name}), seq_len {manifest.seq_len}, created {manifest.created_at}",
        f"tokenizer {manifest.tokenizer.get('uri') or manifest.tokenizer.get('path')} (sha256 {manifest.tokenizer.get('sha256', '')[:12]}…)",
        f"records   {manifest.records} in {len(manifest.shards)} shard(s), "
        f"{sum(s.bytes for s in manifest.shards) / max(total, 1):.3f} bytes/token on disk, "
        + (f"{manifest.payload_bytes / max(total, 1):.3f} bytes/token of record payload" if manifest.payload_bytes
           else "record payload not recorded"),
        f"tokens    {manifest.tokens} + {manifest.pad_tokens} padding "
        f"(pad fraction {manifest.pad_tokens / max(total, 1):.4f}, utilization {manifest.utilization:.4f})",
        "inputs    " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "dead_letter"),
        "dead      " + (", ".join(f"{k} {v}" for k, v in counts.get("dead_letter", {}).items()) or "none"),
    ]
    return "\n".join(lines)


def _span_text(tokens: np.ndarray, vision: np.ndarray, tokenizer: TextTokenizer | None, max_chars: int) -> str:
    if vision.all():
        frames = int(np.sum((tokens == vocab.EOF_ID) | (tokens == vocab.EOV_ID)))
        return f"<{len(tokens)} vision tokens, {frames} frame(s)>"
    if tokenizer is None:
        text = " ".join(map(str, tokens.tolist()))
    else:
        special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
        cuts = [i for i, t in enumerate(tokens.tolist()) if t in special]
        pieces, start = [], 0
        for cut in cuts + [len(tokens)]:
            pieces.append(tokenizer.decode(tokens[start:cut]))
            if cut < len(tokens):
                pieces.append(special[int(tokens[cut])])
            start = cut + 1
        text = "".join(pieces)
    if len(text) > max_chars:
        text = f"{text[: max_chars // 2]} … {text[-max_chars // 2 :]}"
    return text


def record_segments(example: dict[str, np.ndarray], tokenizer: TextTokenizer | None,
                    max_chars: int = 160) -> list[dict]:
    """One record's segments in order: ``{"segment", "tokens", "spans"}``, each span a run of equal loss
    weight and modality, ``{"text", "loss_weight", "vision"}`` (vision spans as ``<N vision tokens …>``)."""
    segments = []
    segment_ids = example["segment_ids"]
    for segment in range(1, int(segment_ids.max(initial=0)) + 1):
        where = np.flatnonzero(segment_ids == segment)
        tokens = example["tokens"][where]
        weights = example["loss_weights"][where]
        vision = example["vision_mask"][where]
        bounds = np.flatnonzero((np.diff(weights) != 0) | (np.diff(vision.astype(int)) != 0)) + 1
        spans = [{"text": _span_text(tokens[start:end], vision[start:end], tokenizer, max_chars),
                  "loss_weight": float(weights[start]), "vision": bool(vision[start])}
                 for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(tokens)]]))]
        segments.append({"segment": segment, "tokens": len(where), "spans": spans})
    return segments


def render_record(example: dict[str, np.ndarray], tokenizer: TextTokenizer | None, max_chars: int = 160) -> str:
    """Segments one per line; ``[loss w: …]`` marks spans with non-zero loss weight, ``<…>`` vision spans."""
    lines = []
    for segment in record_segments(example, tokenizer, max_chars):
        parts = [f"[loss {s['loss_weight']:g}: {s['text']}]" if s["loss_weight"] > 0 else s["text"]
                 for s in segment["spans"]]
        lines.append(f"  segment {segment['segment']} ({segment['tokens']} tokens): {''.join(parts)}")
    padding = int(np.sum(example["segment_ids"] == 0))
    lines.append(f"  padding: {padding} tokens")
    return "\n".join(lines)


def records(directory: str, *, verify_hashes: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Every decoded record of a dataset, shard by shard in manifest order (refuses incomplete datasets, and
    records whose length is not the manifest's ``seq_len``)."""
    manifest = manifest_lib.read(directory, verify_hashes=verify_hashes)
    for path, shard in zip(manifest_lib.shard_paths(directory, manifest), manifest.shards):
        if shard.records:
            with storage.local_copy(path) as local:  # array-record reads local files only
                reader = ArrayRecordReader(local)
                yield from (packed.decode(r, manifest.seq_len) for r in reader.read_all())
                reader.close()


def _tokenizer(manifest: manifest_lib.Manifest, override: str | None) -> tuple[TextTokenizer | None, str]:
    """The tokenizer to render text with (``override``, else the manifest's absolute ``uri``, else its ``path``)
    and a note when none can be loaded."""
    candidates = [override] if override else [manifest.tokenizer.get("uri"), manifest.tokenizer.get("path")]
    for path in filter(None, candidates):
        if FileSystems.exists(path):
            return TextTokenizer(path), ""
    shown = next(filter(None, candidates), None)
    return None, f"(tokenizer {shown} not found: text shown as token ids)" if shown else "(no tokenizer: token ids)"


def _record(directory: str, manifest: manifest_lib.Manifest, record: int) -> tuple[dict[str, np.ndarray], str, int]:
    """Record ``record`` (counted over the shards in manifest order), its shard's path and index in it."""
    if not 0 <= record < manifest.records:
        raise ValueError(f"--record {record} is out of range: {directory} holds {manifest.records} records "
                         f"(0 to {manifest.records - 1})")
    index = record
    for path, shard in zip(manifest_lib.shard_paths(directory, manifest), manifest.shards):
        if index < shard.records:
            break
        index -= shard.records
    with storage.local_copy(path) as local:
        reader = ArrayRecordReader(local)
        example = packed.decode(reader.read([index])[0], manifest.seq_len)
        reader.close()
    return example, shard.path, index


def inspect(directory: str, *, record: int = 0, tokenizer: str | None = None, verify_hashes: bool = True) -> str:
    """The text ``lwm data inspect`` prints: summary, then record ``record`` of the dataset (counted over its
    shards in manifest order) decoded."""
    manifest = manifest_lib.read(directory, verify_hashes=verify_hashes)
    out = [summary(directory, manifest)]
    if not manifest.records:
        out.append("(no records)")
        return "\n".join(out)
    example, shard, index = _record(directory, manifest, record)
    text_tokenizer, note = _tokenizer(manifest, tokenizer)
    out.append(f"record {record} (record {index} of {shard}):" + (f" {note}" if note else ""))
    out.append(render_record(example, text_tokenizer))
    return "\n".join(out)


def inspect_dict(directory: str, *, record: int = 0, tokenizer: str | None = None,
                 verify_hashes: bool = True) -> dict:
    """``lwm data inspect --json``: ``dataset``, ``manifest`` (manifest.json's fields, with ``records`` and
    ``utilization``) and ``record`` (null for an empty dataset): ``index``, ``shard``, ``index_in_shard``,
    ``segments`` (:func:`record_segments`), ``padding``, ``note`` (why text shows as token ids, or "")."""
    manifest = manifest_lib.read(directory, verify_hashes=verify_hashes)
    doc = {"dataset": directory, "manifest": json.loads(manifest.to_json()), "record": None}
    if manifest.records:
        example, shard, index = _record(directory, manifest, record)
        text_tokenizer, note = _tokenizer(manifest, tokenizer)
        doc["record"] = {"index": record, "shard": shard, "index_in_shard": index,
                         "segments": record_segments(example, text_tokenizer),
                         "padding": int(np.sum(example["segment_ids"] == 0)), "note": note}
    return doc
