"""One configuration mechanism for every stage.

A stage's `config.py` holds a dataclass whose defaults a user edits, plus named profiles
(plain instances, e.g. a tiny one for tests and the demo). On the command line every field can
be overridden as `key=value`; `profile=NAME` picks the starting instance. The value is parsed
to the field's declared type; an unknown key or a bad value is a `ConfigError` that lists the
valid keys.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import tokenize
import types
import typing
from pathlib import Path

from core.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    pass


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, text: str, typ):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _coerce(key, text, args[0])
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true or false")
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typ is Path:
            return Path(text)
        if origin in (list, tuple):
            (elem,) = typing.get_args(typ)[:1] or (str,)
            items = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t != ""]
            values = [_coerce(key, json.dumps(i) if not isinstance(i, str) else i, elem) for i in items]
            return values if origin is list else tuple(values)
        if origin is dict or typ is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}={text!r}: cannot be read as {getattr(typ, '__name__', typ)} ({exc})") from None
    raise ConfigError(f"{key}: field type {typ} cannot be set from the command line")


def field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def apply_overrides(cfg, overrides: dict[str, str]):
    """Return a copy of `cfg` with string overrides parsed to each field's type."""
    types_by_name = field_types(type(cfg))
    changes = {}
    for key, text in overrides.items():
        if key not in types_by_name:
            raise ConfigError(f"unknown config key {key!r}. Valid keys: {', '.join(sorted(types_by_name))}")
        changes[key] = text if not isinstance(text, str) else _coerce(key, text, types_by_name[key])
    return dataclasses.replace(cfg, **changes)


def parse_args(cls, argv: list[str] | None = None, profiles: dict | None = None):
    """Build a config from `key=value` tokens. `profile=NAME` selects a preset first; `--help` lists the keys."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if any(token in ("-h", "--help") for token in argv):
        chosen = next((t.split("=", 1)[1] for t in argv if t.startswith("profile=")), None)
        print(describe(cls, profiles, chosen))
        raise SystemExit(0)
    overrides: dict[str, str] = {}
    for token in argv:
        if "=" not in token:
            raise ConfigError(f"argument {token!r} is not key=value. Valid keys: {', '.join(sorted(field_types(cls)))}")
        key, value = token.split("=", 1)
        overrides[key.strip().lstrip("-").replace("-", "_")] = value
    profiles = profiles or {}
    name = overrides.pop("profile", None)
    if name is None:
        cfg = cls()
    elif name in profiles:
        cfg = dataclasses.replace(profiles[name])
    else:
        raise ConfigError(f"unknown profile {name!r}; profiles: {', '.join(sorted(profiles)) or 'none'}")
    return apply_overrides(cfg, overrides)


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """{field: the comment written after it in the class's source}, e.g. what `lr: float = 1e-3  # the
    one-cycle peak` says, joined with the comment-only lines below it whose text starts in the same column;
    a field without one is left out."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined where no source can be read (an interactive session)
        return comments
    names = set(field_types(cls))
    field_name, depth, line_start = None, 0, True
    continues = None  # (field, column) a comment-only line whose text starts in that column continues
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, text = token.type, token.string
        words = text.lstrip("#").strip()
        column = token.start[1] + len(text) - len(text.lstrip("#").lstrip())  # where the comment's words start
        if kind in (tokenize.NEWLINE, tokenize.NL) and depth == 0:
            field_name, line_start = None, True
            continue
        if kind in (tokenize.INDENT, tokenize.DEDENT):
            continue
        if kind == tokenize.COMMENT and line_start:
            if continues and abs(continues[1] - column) <= 2:  # aligned by hand, give or take a column
                comments[continues[0]] += " " + words
            else:
                continues = None
        elif kind == tokenize.COMMENT and field_name and field_name not in comments:
            comments[field_name] = words
            continues = (field_name, column)
        elif line_start:
            continues = None
            # a field's line starts with its name
            field_name = text if kind == tokenize.NAME and text in names else None
        if kind == tokenize.OP:
            depth += text in "([{"
            depth -= text in ")]}"
        line_start = False
    return comments


def describe_config(cfg, title: str, prefix: str = "") -> str:
    """`title`, then one line per field of `cfg`: key = value  # its comment from the config's source."""
    comments = field_comments(type(cfg))
    lines = [title]
    for name in field_types(type(cfg)):
        value = getattr(cfg, name)
        line = f"  {prefix}{name} = {value if isinstance(value, Path) else repr(value)}"
        lines.append(f"{line}  # {comments[name]}" if name in comments else line)
    return "\n".join(lines)


def describe(cls, profiles: dict | None = None, profile: str | None = None) -> str:
    """Every key of `cls` with its default (the chosen profile's, else the `default` profile's, else the
    class's) and its comment."""
    profiles = profiles or {}
    if profile is not None and profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(sorted(profiles)) or 'none'}")
    name = profile or ("default" if "default" in profiles else None)
    cfg = profiles[name] if name else cls()
    shown = f" (profile {name})" if name else ""
    text = describe_config(cfg, f"{cls.__module__}.{cls.__name__}: key=value overrides, defaults{shown}")
    if profiles:
        text += f"\n  profile = one of {', '.join(sorted(profiles))}  # the preset the overrides start from"
    return text


def to_dict(cfg) -> dict:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls, data: dict):
    """Rebuild a config saved by `to_dict`, ignoring keys the class no longer has."""
    types_by_name = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_by_name:
            continue
        typ = types_by_name[key]
        if typ is Path or (typing.get_origin(typ) in (typing.Union, types.UnionType) and Path in typing.get_args(typ)):
            value = None if value is None else Path(value)
        elif typing.get_origin(typ) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def same_settings(saved: dict, current: dict) -> bool:
    """Whether two saved configs describe the same run; `resume` is a control, not a setting."""
    strip = lambda d: {k: v for k, v in d.items() if k != "resume"}
    return strip(saved) == strip(current)
