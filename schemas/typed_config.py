"""Typed configs from plain mappings: one ``from_mapping`` for every frozen-dataclass config.

YAML files, ``--set`` overrides, checkpoints' JSON and presets all arrive as nested
mappings; ``from_mapping(cls, mapping)`` turns one into dataclass ``cls``:

- unknown keys are refused, naming the closest known key (``learning_rat`` →
  ``learning_rate``) or, for a key a class lists in ``RENAMED`` (``{old: new}``),
  its new name;
- values are checked against the field's type (``int``, ``float``, ``str``,
  ``bool``, nested dataclasses, ``tuple[X, ...]``, ``X | None``); YAML's ``4e-5``
  (a string in YAML 1.1) is accepted as a float;
- a nested section overrides the field's *default value*, not its class's
  defaults: ``mesh: {fsdp: 2}`` keeps the other axes of the enclosing default;
- a class with a ``from_preset(name)`` classmethod accepts a ``preset`` key: the
  preset is the base and the other keys override it (``model: {preset: tiny}``);
- a field with a ``parse`` function in its metadata (:func:`schemas.flags.field`)
  takes the same text its flag takes (``buckets: "512,1024"``).

Errors are ``ValueError`` naming the dotted key (``config.optimizer.warmup_steps``).
``describe(cls)`` lists every key with its default, for ``--help`` texts.
Pure Python: importable by pipelines, trainer and CLI alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping

PRESET_KEY = "preset"


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, so YAML and JSON write plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _unknown_key_message(cls: type, key: str, names: list[str], where: str) -> str:
    renamed = getattr(cls, "RENAMED", {})
    if key in renamed:
        return f"{where}.{key} was renamed: use {where}.{renamed[key]}"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {where}.{close[0]}?" if close else f"known keys: {', '.join(names)}"
    return f"{where}: unknown key {key!r}; {hint}"


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str = "config", base: Any = None) -> Any:
    """Dataclass ``cls`` from ``mapping``; fields it does not name come from ``base`` (an instance) or defaults."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {mapping!r}")
    mapping = dict(mapping)
    if PRESET_KEY in mapping and hasattr(cls, "from_preset"):
        name = mapping.pop(PRESET_KEY)
        try:
            base = cls.from_preset(name)
        except ValueError as error:
            raise ValueError(f"{where}.{PRESET_KEY}: {error}") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in mapping:
        if key not in fields:
            raise ValueError(_unknown_key_message(cls, key, list(fields), where))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        default = getattr(base, name) if base is not None else _field_default(field)
        if name in mapping and field.metadata.get("parse") and isinstance(mapping[name], (str, int)):
            values[name] = _parsed(field.metadata["parse"], mapping[name], f"{where}.{name}")
        elif name in mapping:
            values[name] = _convert(hints[name], mapping[name], f"{where}.{name}", default)
        elif default is not dataclasses.MISSING:
            values[name] = default
        else:
            raise ValueError(f"{where}: {name} must be set")
    return cls(**values)


def _parsed(parse, value: Any, where: str) -> Any:
    try:
        return parse(str(value))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _convert(tp: Any, value: Any, where: str, default: Any = dataclasses.MISSING) -> Any:
    """``value`` as type ``tp``, or ValueError naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(tp, value, where, default)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        base = default if isinstance(default, tp) else None
        return from_mapping(tp, value, where, base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in args if a is not Ellipsis}
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 4e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return f"list of {_type_name(item)}"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type, base: Any = None, prefix: str = "") -> list[str]:
    """One line per key of ``cls`` (nested sections flattened): ``key = default  (type)``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = getattr(base, field.name) if base is not None else _field_default(field)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            lines += describe(hints[field.name], default if default is not dataclasses.MISSING else None, key + ".")
        else:
            shown = "(required)" if default is dataclasses.MISSING else repr(to_plain(default))
            lines.append(f"{key} = {shown}  ({_type_name(hints[field.name])})")
    return lines
