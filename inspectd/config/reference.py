"""The configuration reference (docs/configuration.md), written from the schema: every key, its default,
how a reload treats it and its description. `python -m inspectd.config.reference > docs/configuration.md`;
a test fails when the file and the schema differ."""

from __future__ import annotations

__all__ = ["markdown"]

import json
import typing

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from inspectd.config.base import is_path_field, reload_of
from inspectd.config.loading import section_model
from inspectd.config.settings import Settings

_HEAD = """# Configuration reference

Every key of the daemon's TOML configuration, written from the schema (`inspectd/config/`) by
`python -m inspectd.config.reference > docs/configuration.md`; a test fails when this file and the
schema differ. `config.example.toml` is the commented example; [daemon.md](daemon.md#configuration)
says how the file is read (environment overrides `INSPECTD_<SECTION>__<KEY>`, errors, exit 78).

**Reload** is what `systemctl reload inspectd` (SIGHUP) does when the key changed
([daemon.md](daemon.md#reload-systemctl-reload-inspectd--sighup)): *engine* = the model is loaded
again and a new engine warmed up beside the running one; *context* = new thresholds and output
options for the next batch; *live* = read at each use; *restart* = applies at the next restart (the
daemon keeps running the old value). A changed `[[cameras]]` table restarts that camera alone (but
for `model`, `threshold`, `mask_rule` and `min_region_px`: a new context, the camera keeps running);
a changed `[[models]]` table gets that model a new engine or context, the other models keep theirs.
**Path** keys: a relative path is relative to the config file.
"""


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    return "(none)" if value is None else f"`{json.dumps(value)}`"


_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _allowed(field: FieldInfo) -> str:
    """The bounds (>= 0, <= 1) or choices ("a" | "b") the schema enforces; "" if none."""
    metadata = list(field.metadata)
    for arg in typing.get_args(field.annotation):  # an int with bounds inside a union ("auto" | 1-256)
        if typing.get_origin(arg) is typing.Annotated:
            metadata += [m for info in typing.get_args(arg)[1:] if isinstance(info, FieldInfo) for m in info.metadata]
    bounds = [f"{sign} {getattr(m, attr)}" for m in metadata for kind, attr, sign in _BOUNDS if isinstance(m, kind)]
    choices = [
        a
        for arg in (field.annotation, *typing.get_args(field.annotation))
        if typing.get_origin(arg) is typing.Literal
        for a in typing.get_args(arg)
    ]
    return ", ".join(bounds + ([" \\| ".join(json.dumps(c) for c in choices)] if choices else []))


def _section(name: str, model: type[BaseModel], table: bool) -> list[str]:
    title = f"## `[[{name}]]`" if table else f"## `[{name}]`"
    lines = [title, "", "| key | default | allowed | reload | description |", "|---|---|---|---|---|"]
    for key, field in model.model_fields.items():
        reload = reload_of(field)
        how = reload.value if reload else ("camera" if name == "cameras" else "-" if key == "id" else "restart")
        kind = " (path)" if is_path_field(field) else ""
        text = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{key}`{kind} | {_default(field)} | {_allowed(field)} | {how} | {text} |")
    return lines + [""]


def markdown() -> str:
    """The whole reference, as docs/configuration.md holds it."""
    out = [_HEAD]
    for name, field in Settings.model_fields.items():
        model = typing.cast(type[BaseModel], section_model(field.annotation))  # every key of Settings is a section
        out += _section(name, model, table=name in ("cameras", "models"))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
