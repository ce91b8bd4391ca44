"""``lwm data inspect``: a readable view of a packed dataset (manifest summary + one record)."""

from __future__ import annotations

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


def render_record(example: dict[str, np.ndarray], tokenizer: TextTokenizer | None, max_chars: int = 160) -> str:
    """Segments one per line; ``[loss w: …]`` marks spans with non-zero loss weight, ``<…>`` vision spans."""
    lines = []
    segment_ids = example["segment_ids"]
    for segment in range(1, int(segment_ids.max(initial=0)) + 1):
        where = np.flatnonzero(segment_ids == segment)
        tokens = example["tokens"][where]
        weights = example["loss_weights"][where]
        vision = example["vision_mask"][where]
        # Runs of equal (weight, modality) inside the segment, rendered in order.
        bounds = np.flatnonzero((np.diff(weights) != 0) | (np.diff(vision.astype(int)) != 0)) + 1
        parts = []
        for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(tokens)]])):
            text = _span_text(tokens[start:end], vision[start:end], tokenizer, max_chars)
            weight = float(weights[start])
            parts.append(f"[loss {weight:g}: {text}]" if weight > 0 else text)
        lines.append(f"  segment {segment} ({len(where)} tokens): {''.join(parts)}")
    padding = int(np.sum(segment_ids == 0))
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


def inspect(directory: str, *, record: int = 0, tokenizer: str | None = None, verify_hashes: bool = True) -> str:
    """The text ``lwm data inspect`` prints: summary, then record ``record`` of the dataset (counted over its
    shards in manifest order) decoded."""
    manifest = manifest_lib.read(directory, verify_hashes=verify_hashes)
    out = [summary(directory, manifest)]
    if not manifest.records:
        out.append("(no records)")
        return "\n".join(out)
    if not 0 <= record < manifest.records:
        raise ValueError(f"--record {record} is out of range: {directory} holds {manifest.records} records "
                         f"(0 to {manifest.records - 1})")
    text_tokenizer, note = _tokenizer(manifest, tokenizer)
    index = record
    for path, shard in zip(manifest_lib.shard_paths(directory, manifest), manifest.shards):
        if index < shard.records:
            break
        index -= shard.records
    with storage.local_copy(path) as local:
        reader = ArrayRecordReader(local)
        example = packed.decode(reader.read([index])[0], manifest.seq_len)
        reader.close()
    out.append(f"record {record} (record {index} of {shard.path}):" + (f" {note}" if note else ""))
    out.append(render_record(example, text_tokenizer))
    return "\n".join(out)
