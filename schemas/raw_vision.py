"""Raw image-text and video-text inputs.

One example is an ``id``, a ``caption`` and the image or video, given one of three ways
(the first present wins):

* inline bytes in the media field (``image`` for image-text, ``video`` for video-text):
  a binary column in Parquet, a base64 string in JSON lines;
* ``path``: a file on any Beam filesystem (local, ``gs://``); a relative path is
  resolved against the directory of the input file that names it;
* ``url``: the same, under the name web-scale datasets use (read with Beam
  FileSystems, so ``gs://`` and local paths; a scheme no Beam filesystem serves
  becomes a dead letter when the media is fetched).

Input files are JSON lines (``.jsonl``, ``.json``) or Parquet (``.parquet``), ``.gz``
allowed on top; columns as :data:`IMAGE_TEXT_SCHEMA` / :data:`VIDEO_TEXT_SCHEMA`.

Parsing is pure (bytes in, :class:`VisionExample` or :class:`~schemas.raw.DeadLetter`
out): bad input never raises, it becomes a dead letter with a reason from
:data:`REASONS` (the media stage adds its own, see ``pipelines.tokens.media``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import posixpath
from typing import Any, Iterator

import pyarrow as pa

from schemas.raw import COMMON_REASONS, DeadLetter, id_and_text, iter_records, source_of

MEDIA_FIELDS = ("image", "video")  # the inline-bytes field of image-text and video-text inputs
LOCATION_FIELDS = ("path", "url")


def _schema(media_field: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field(media_field, pa.binary()),
            pa.field("path", pa.string()),
            pa.field("url", pa.string()),
        ]
    )


IMAGE_TEXT_SCHEMA = _schema("image")
VIDEO_TEXT_SCHEMA = _schema("video")

REASONS = COMMON_REASONS + ("missing_caption", "empty_caption", "missing_media", "invalid_media")


@dataclasses.dataclass(frozen=True)
class VisionExample:
    """One raw image-text or video-text example: inline ``media`` bytes or a ``location`` to fetch.

    ``path`` and ``index`` say where it came from (input file, 1-based line or row).
    """

    id: str
    caption: str
    path: str
    index: int
    media: bytes | None = None
    location: str | None = None

    @property
    def source(self) -> str:
        return f"{self.path}:{self.index}"


def resolve_location(location: str, input_path: str) -> str:
    """``location`` as an absolute path or URI; relative ones are taken from ``input_path``'s directory."""
    if "://" in location or location.startswith("/"):
        return location
    return posixpath.join(posixpath.dirname(input_path), location)


def from_fields(fields: Any, media_field: str, path: str, index: int) -> VisionExample | DeadLetter:
    """Validate one record (a JSON object or a Parquet row as a dict)."""
    if media_field not in MEDIA_FIELDS:
        raise ValueError(f"media field must be one of {MEDIA_FIELDS}, got {media_field!r}")
    source = source_of(path, index)
    checked = id_and_text(fields, "caption", source)
    if isinstance(checked, DeadLetter):
        return checked
    example_id, caption = checked
    media = fields.get(media_field)
    if media is not None:
        if isinstance(media, str):  # JSON carries bytes as base64
            try:
                media = base64.b64decode(media, validate=True)
            except (binascii.Error, ValueError) as error:
                return DeadLetter(example_id, "invalid_media", f"'{media_field}' is not base64: {error}", source)
        if not isinstance(media, bytes):
            return DeadLetter(example_id, "invalid_media", f"'{media_field}' is a {type(media).__name__}", source)
        return VisionExample(example_id, caption, path, index, media=media)
    for name in LOCATION_FIELDS:
        location = fields.get(name)
        if location is None:
            continue
        if not isinstance(location, str) or not location.strip():
            return DeadLetter(example_id, "invalid_media", f"'{name}' is not a non-empty string", source)
        return VisionExample(example_id, caption, path, index, location=resolve_location(location.strip(), path))
    return DeadLetter(example_id, "missing_media", f"none of '{media_field}', 'path', 'url'", source)


def iter_examples(stream, path: str, media_field: str, first_line: int = 1) -> Iterator[VisionExample | DeadLetter]:
    """Every record of one input file, or of a range of lines of one (see :func:`schemas.raw.iter_records`:
    JSON lines or Parquet)."""
    return iter_records(stream, path, functools.partial(from_fields, media_field=media_field), ("id", "caption"),
                        parquet_batch=64, first_line=first_line)  # rows carry inline images
