"""Command-line flags derived from a config dataclass, so every setting lives in one place.

A data job's config (a frozen dataclass, possibly holding others) is the single
source of its settings: :func:`add_flags` turns each leaf field into an argparse
option, and :func:`from_args` turns the parsed namespace back into the config.

- name: ``--field-name`` (``_`` → ``-``); nested configs are flattened, so leaf
  names must be distinct across the tree. :func:`field`'s ``flag`` (or the
  ``renames`` argument, for configs owned elsewhere) gives another name.
- type: from the annotation: ``int``, ``float``, ``str``; ``X | None`` also takes
  ``none``; ``Literal[...]`` gives choices; ``tuple[str, ...]`` takes one or more
  values; :func:`field`'s ``parse`` converts anything else from one string. Values
  are converted by :func:`from_args`: a bad one is a ``ValueError`` naming its flag.
- ``bool``: ``--name`` sets a field that defaults to False; a field that defaults
  to True gets ``--no-name``.
- :func:`field`'s ``repeat``: a ``tuple`` field given one value per use of its flag
  (``--data a --data b``) instead of several values after one.
- help: the field's docstring (a string literal right after it), or its entry
  ``name: text`` in the class docstring, followed by the default.
- a field without a default is a required option.

Example::

    @dataclasses.dataclass(frozen=True)
    class Config:
        seq_len: int = 2048
        \"\"\"Tokens per packed sequence.\"\"\"

    add_flags(parser, Config)          # --seq-len SEQ_LEN  Tokens per packed sequence. (default: 2048)
    from_args(Config, parser.parse_args(["--seq-len", "512"]))   # Config(seq_len=512)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable, Iterator, Mapping

_ENTRY = re.compile(r"^(?:``)?(\w+)(?:``)?:\s+(.*)$")


def field(default: Any = dataclasses.MISSING, *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
          metavar: str | None = None, aliases: tuple[str, ...] = (), hidden: bool = False, record: bool = True,
          repeat: bool = False) -> Any:
    """A dataclass field with command-line metadata (see the module docstring); ``hidden`` keeps it off the CLI,
    ``record=False`` out of the manifests (:func:`pipelines.kit.output.recorded`)."""
    metadata = {"flag": flag, "parse": parse, "metavar": metavar, "aliases": aliases, "hidden": hidden,
                "record": record, "repeat": repeat}
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: its attribute docstring, else its ``name: text`` entry in the class docstring."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines = inspect.cleandoc(klass.__doc__ or "").splitlines()
        for index, line in enumerate(lines):
            match = _ENTRY.match(line)
            if match:
                rest = _continuation(lines[index + 1:])
                docs[match.group(1)] = " ".join([match.group(2), *rest])
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _continuation(lines: list[str]) -> list[str]:
    """The continuation lines of a docstring entry: the indented lines right after it."""
    rest = []
    for line in lines:
        if not line.startswith(" ") or not line.strip():
            break
        rest.append(line.strip())
    return rest


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]  # field names from the root config
    field: dataclasses.Field
    type: Any
    doc: str

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, (*prefix, f.name))
        else:
            yield _Leaf((*prefix, f.name), f, kind, docs.get(f.name, ""))


def _optional(kind) -> tuple[Any, bool]:
    """(the type inside ``X | None``, True) or (kind, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


class _Given(str):
    """A value as typed on the command line, with its flag: :func:`from_args` converts it, so a bad
    value is a one-line ``ValueError`` naming the flag (argparse would print its usage too)."""

    def __new__(cls, text: str, flag: str):
        given = super().__new__(cls, text)
        given.flag = flag
        return given


def _converter(leaf: _Leaf) -> Callable[[str], Any]:
    parse = leaf.field.metadata.get("parse")
    inner, optional = _optional(leaf.type)
    if typing.get_origin(inner) is tuple and not parse:
        inner = typing.get_args(inner)[0]
    convert = parse or (inner if inner in (int, float, str) or typing.get_origin(inner) is typing.Literal else None)
    if convert is None:
        raise TypeError(f"no command-line form for {leaf.dest}: {leaf.type}; give flags.field(parse=...)")
    if typing.get_origin(convert) is typing.Literal:
        convert = str  # argparse has checked the choices

    def converted(given: _Given):
        if optional and given.lower() == "none":
            return None
        try:
            return convert(str(given))
        except ValueError as error:
            raise ValueError(f"--{given.flag} {given}: {error}") from None

    return converted


def _default(leaf: _Leaf) -> Any:
    if leaf.field.default is not dataclasses.MISSING:
        return leaf.field.default
    if leaf.field.default_factory is not dataclasses.MISSING:
        return leaf.field.default_factory()
    return dataclasses.MISSING


def add_flags(parser: argparse.ArgumentParser, cls: type, *, renames: Mapping[str, str | None] | None = None,
              given_only: bool = False) -> None:
    """Add one option per leaf field of ``cls``; ``renames`` maps a dotted field path to a flag name
    (None: keep the field off the command line, at its default). With ``given_only`` an option left out
    sets nothing, so :func:`from_args` with a ``base`` config changes only what was typed."""
    renames = dict(renames or {})
    seen: dict[str, str] = {}
    for leaf in _leaves(cls):
        meta = leaf.field.metadata
        renamed = renames.pop(leaf.dest, "")
        if meta.get("hidden") or renamed is None:
            continue
        name = renamed or meta.get("flag") or leaf.path[-1].replace("_", "-")
        if name in seen:
            raise TypeError(f"{cls.__name__}: --{name} would set both {seen[name]} and {leaf.dest}")
        seen[name] = leaf.dest
        default = _default(leaf)
        doc = leaf.doc or leaf.path[-1].replace("_", " ")
        unset = {"default": argparse.SUPPRESS} if given_only else {}
        if leaf.type is bool:
            if default is True:
                parser.add_argument(f"--no-{name}", dest=leaf.dest, action="store_false",
                                    help=f"{doc} (on by default; this flag turns it off)", **unset)
            else:
                parser.add_argument(f"--{name}", dest=leaf.dest, action="store_true", help=doc, **unset)
            continue
        _converter(leaf)  # a field without a command-line form fails here, when the CLI is built
        kwargs: dict[str, Any] = {"dest": leaf.dest, "help": doc, "type": functools.partial(_Given, flag=name)}
        inner, _ = _optional(leaf.type)
        if typing.get_origin(inner) is typing.Literal:
            kwargs["choices"] = typing.get_args(inner)
        elif typing.get_origin(inner) is tuple and meta.get("repeat"):
            kwargs["action"] = "append"
        elif typing.get_origin(inner) is tuple and not meta.get("parse"):
            kwargs["nargs"] = "+"
        if "choices" not in kwargs:
            kwargs["metavar"] = meta.get("metavar") or name.upper().replace("-", "_")
        if _optional(leaf.type)[1] and default is not None:
            doc += " ('none' unsets it)"
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if given_only else default
            kwargs["help"] = f"{doc} (default: {_shown(default)})"
        parser.add_argument(f"--{name}", *meta.get("aliases", ()), **kwargs)
    if renames:
        raise TypeError(f"{cls.__name__} has no fields {sorted(renames)} to rename")


def to_argv(config: Any, *, renames: Mapping[str, str | None] | None = None) -> list[str]:
    """The options that :func:`add_flags` (with the same ``renames``) and :func:`from_args` turn back into
    ``config``: one per leaf field whose value is not its default, and every required one."""
    renames = dict(renames or {})
    argv: list[str] = []
    for leaf in _leaves(type(config)):
        meta = leaf.field.metadata
        if meta.get("hidden") or renames.get(leaf.dest, "") is None:
            continue
        value = functools.reduce(getattr, leaf.path, config)
        default = _default(leaf)
        if default is not dataclasses.MISSING and value == default:
            continue
        name = renames.get(leaf.dest) or meta.get("flag") or leaf.path[-1].replace("_", "-")
        inner, optional = _optional(leaf.type)
        if leaf.type is bool:
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif value is None and optional:
            argv += [f"--{name}", "none"]
        elif typing.get_origin(inner) is tuple and meta.get("repeat"):
            argv += [item for v in value for item in (f"--{name}", str(v))]
        elif typing.get_origin(inner) is tuple and not meta.get("parse"):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", shown(value)]
    return argv


def to_mapping(config: Any) -> dict[str, Any]:
    """``config`` as plain data that :func:`schemas.typed_config.from_mapping` turns back into it: nested
    configs as mappings, tuples as lists, fields with a ``parse`` function as the text their flag takes."""
    mapping = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            mapping[f.name] = to_mapping(value)
        elif f.metadata.get("parse"):
            mapping[f.name] = shown(value)
        else:
            mapping[f.name] = list(value) if isinstance(value, tuple) else value
    return mapping


def shown(value: Any) -> str:
    """A value as its flag takes it (tuples of buckets as their specs, comma-separated)."""
    if isinstance(value, tuple):
        return ",".join(getattr(v, "spec", lambda v=v: str(v))() for v in value)
    return str(value)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return shown(value) or "none"
    return "none" if value is None else repr(value) if value == "" else str(value)


def from_args(cls: type, args: argparse.Namespace, prefix: tuple[str, ...] = (), base: Any = None) -> Any:
    """The config ``cls`` from options added by :func:`add_flags`; fields not on the command line keep
    ``base``'s values (a config of ``cls``), or their defaults."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_args(kind, args, (*prefix, f.name), getattr(base, f.name, None))
            continue
        dest = ".".join((*prefix, f.name))
        if not hasattr(args, dest):
            if base is not None:
                values[f.name] = getattr(base, f.name)
            continue
        value = getattr(args, dest)
        if isinstance(value, (_Given, list)):
            convert = _converter(_Leaf((*prefix, f.name), f, kind, ""))
            value = tuple(map(convert, value)) if isinstance(value, list) else convert(value)
        values[f.name] = value
    return cls(**values)


def number_list(kind):
    """A flag parser of comma-separated numbers of ``kind`` (sweeps' lengths, depths, frame counts)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    return parse
