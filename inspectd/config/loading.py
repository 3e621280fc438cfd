"""Reading TOML into a configuration model: relative paths resolved, every error in one line naming its key.

Shared by the daemon's config (`inspectd.config.settings`) and the bridges' (`inspectd.bridges.config`).
"""

from __future__ import annotations

__all__ = [
    "ENV_PREFIX",
    "read_toml",
    "resolve_paths",
    "format_errors",
    "load_toml_model",
    "closest",
    "env_path",
    "env_names",
    "origin",
    "section_model",
]

import difflib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from inspectd.config.base import is_path_field
from inspectd.errors import ConfigError
from inspectd.model.deployable import BUILTIN_DEMO_MODEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "INSPECTD_"


def read_toml(path: Path) -> dict:
    """The file's TOML as a dict; ConfigError in one line for a missing, unreadable or invalid file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}, offset "
            f"{exc.start}); save the config as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _relative_to(base: Path, value: str) -> str:
    if not value or value.startswith(BUILTIN_DEMO_MODEL) or "://" in value or "\x00" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (itself, or the element of a list of them), else None."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def resolve_paths(data: Any, model: type[BaseModel], base: Path) -> Any:
    """`data` (as read from TOML) with every `PathText` value relative to `base`, as declared by `model`'s fields.

    Values of the wrong type are left for validation to report."""
    if isinstance(data, list):
        return [resolve_paths(item, model, base) for item in data]
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        inner = section_model(field.annotation)
        if inner is not None:
            out[name] = resolve_paths(out[name], inner, base)
        elif is_path_field(field) and isinstance(out[name], str):
            out[name] = _relative_to(base, out[name])
    return out


def env_path(name: str) -> tuple[str, ...]:
    """INSPECTD_MODEL__THRESHOLD -> ("model", "threshold"), as pydantic-settings splits it."""
    return tuple(name[len(ENV_PREFIX) :].lower().split("__"))


def closest(word: str, candidates: list[str], prefix: str = "") -> str:
    """ "; did you mean PREFIX+CANDIDATE?" for the closest candidate, or "" if none is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def env_names(root: type[BaseModel]) -> list[str]:
    """Every INSPECTD_* variable that sets configuration of `root`: a whole section as JSON, or one key of it."""
    names = []
    for section, field in root.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in field.annotation.model_fields]
    return names


def _sets(name: str, value: str, loc: tuple) -> bool:
    """Whether variable `name` (= `value`) supplied the value at `loc` (keys and list indexes)."""
    path, parts = env_path(name), tuple(str(p).lower() for p in loc)
    n = min(len(path), len(parts))
    if path[:n] != parts[:n]:
        return False
    if len(path) >= len(parts):
        return True
    try:  # a whole section or the camera list as JSON: does it hold the rest of loc?
        node = json.loads(value)
    except ValueError:
        return False
    for part in loc[len(path) :]:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def origin(loc: tuple, env: dict[str, str]) -> str | None:
    """The most specific INSPECTD_* variable that supplied the value at `loc`, or None (it came from the file)."""
    names = sorted((n for n in env if _sets(n, env[n], loc)), key=lambda n: -len(env_path(n)))
    return names[0] if names else None


def _keys_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The keys allowed at `loc` (a path of keys and list indexes into `root`); [] if unknown."""
    model: type[BaseModel] = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = section_model(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _redact(text: str) -> str:
    """scheme://user:password@host -> scheme://user:***@host (camera URLs in error messages)."""
    return re.sub(r"(://[^:@/\s]*):[^@\s]*@", r"\1:***@", text)


def _describe(err: ErrorDetails, source: str | None, root: type[BaseModel]) -> str:
    loc = err["loc"]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        if source is not None and env_path(source) == tuple(str(p).lower() for p in loc):
            return f"{key}: unknown key{closest(source, env_names(root))}"
        parent = "".join(f"{p}." for p in loc[:-1])
        return f"{key}: unknown key{closest(str(loc[-1]), _keys_at(loc[:-1], root), parent)}"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list | tuple) else f" (got {_redact(repr(value))[:120]})"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"


def format_errors(errors: list[ErrorDetails], env: dict[str, str], where: str, root: type[BaseModel]) -> str:
    """One line: the errors grouped by where each value came from (the file, or an INSPECTD_* variable)."""
    groups: dict[str, list[str]] = {}
    for err in errors:
        source = origin(err["loc"], env)
        groups.setdefault(source or where, []).append(_describe(err, source, root))
    return "; ".join(f"{src}: {'; '.join(msgs)}" if src else "; ".join(msgs) for src, msgs in groups.items())


M = typing.TypeVar("M", bound=BaseModel)


def load_toml_model(path: Path, model: type[M]) -> M:
    """A TOML file validated into `model` (no environment overrides), relative paths relative to the file:
    the daemon's errors, in one line naming the key (ConfigError)."""
    data = resolve_paths(read_toml(path), model, path.resolve().parent)
    try:
        return model(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc.errors(include_url=False), {}, str(path), model)) from None
