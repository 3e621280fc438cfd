"""The whole daemon configuration: one pydantic model per TOML section, env overrides `INSPECTD_<SECTION>__<KEY>`.

Unknown keys are errors; every error names the key (or the INSPECTD_* variable it came from), the
bad value and what is allowed, in one line. Relative paths are relative to the config file.
`load_settings(path)` is the one entry point: it also refuses a config without cameras and warns
about INSPECTD_* variables that set nothing.
"""

from __future__ import annotations

__all__ = ["Settings", "load_settings", "DEFAULT_CONFIG", "config_env_names", "NON_CONFIG_ENV", "reload_table"]

import json
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import cast
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from inspectd.config.base import Reload, reload_of, repeated
from inspectd.config.cameras import CameraConfig
from inspectd.config.daemon import DaemonConfig
from inspectd.config.loading import (
    ENV_PREFIX,
    closest,
    env_names,
    env_path,
    format_errors,
    origin,
    read_toml,
    resolve_paths,
    section_model,
)
from inspectd.config.model import DEFAULT_MODEL_ID, ModelConfig, ModelEntry
from inspectd.config.outputs import ArchiveConfig, MetricsConfig, PublishConfig, ReplayConfig, TriggerConfig, UiConfig
from inspectd.config.pipeline import BatchingConfig, EpisodesConfig, PostprocessConfig
from inspectd.errors import ConfigError
from inspectd.security import check_config_file

log = logging.getLogger("inspectd.config")

DEFAULT_CONFIG = Path("/etc/inspectd/config.toml")
# INSPECTD_* variables that are not configuration: read by inspectd itself, its tests or its scripts.
NON_CONFIG_ENV = frozenset(
    {
        "INSPECTD_DEBUG",  # cli.py: tracebacks instead of one-line internal errors
        "INSPECTD_TEST_FREEZE_INFERENCE",  # pipeline/core.py: test hook that blocks inference
        "INSPECTD_VENV",  # scripts/*.sh: the virtual environment
        "INSPECTD_SLIM_VENV",  # scripts/test.sh: the install without TensorFlow tests/test_slim.py runs in
        "INSPECTD_APT_PACKAGES",  # scripts/bootstrap.sh
        "INSPECTD_PIP_ARGS",  # deploy/install.sh
    }
)


class Settings(BaseSettings):
    """The whole daemon configuration (mirrors config.example.toml).

    Constructible in code with any cameras (tests, bench); `load_settings` adds the checks of a
    config the daemon runs: at least one camera, errors attributed to the file or a variable.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    models: list[ModelEntry] = Field(
        default_factory=list,
        description="one [[models]] table per model when cameras use several; without any, [model] is the one model "
        f"(id {DEFAULT_MODEL_ID!r})",
    )
    batching: BatchingConfig = BatchingConfig()
    cameras: list[CameraConfig] = Field(
        default_factory=list, description="one [[cameras]] table per camera; load_settings requires at least one"
    )
    postprocess: PostprocessConfig = PostprocessConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    replay: ReplayConfig = ReplayConfig()
    trigger: TriggerConfig = TriggerConfig()
    archive: ArchiveConfig = ArchiveConfig()
    ui: UiConfig = UiConfig()
    daemon: DaemonConfig = DaemonConfig()

    @field_validator("cameras", "models")
    @classmethod
    def _unique_ids(cls, tables: list, info: ValidationInfo) -> list:
        """Camera ids and model ids name one table each."""
        dupes = repeated([t.id for t in tables])
        if dupes:
            raise ValueError(f"{str(info.field_name)[:-1]} ids must be unique; repeated: {', '.join(dupes)}")
        return tables

    @model_validator(mode="after")
    def _cameras_name_models(self) -> Settings:
        """[model] or [[models]], not both; a camera's `model` names one of them."""
        if self.models and self.model != ModelConfig():
            raise ValueError("set [model] (one model) or [[models]] tables (several), not both")
        self._check_shadows()
        ids = [m.id for m in self.production_models]
        for cam in self.cameras:
            if cam.model is not None and cam.model not in ids:
                shadow = " (a shadow: cameras name its model)" if cam.model in self._shadow_ids() else ""
                known = "the [[models]] ids are " if self.models else "[model] is the one model, id "
                raise ValueError(f"cameras[{cam.id}].model: no model {cam.model!r}{shadow}; {known}{', '.join(ids)}")
        return self

    def _shadow_ids(self) -> set[str]:
        return {m.id for m in self.models if m.shadow_of is not None}

    def _check_shadows(self) -> None:
        """A shadow follows a model that is not itself a shadow, one shadow per model; some model is not a shadow."""
        production = {m.id for m in self.models if m.shadow_of is None}
        if self.models and not production:
            raise ValueError("models: every [[models]] table is a shadow (shadow_of); at least one model must not be")
        followed = [m.shadow_of for m in self.models if m.shadow_of is not None]
        for m in self.models:
            if m.shadow_of is not None and m.shadow_of not in production:
                what = "itself" if m.shadow_of == m.id else "a shadow" if m.shadow_of in self._shadow_ids() else "no model"
                models = ", ".join(sorted(production))
                raise ValueError(f"models[{m.id}].shadow_of: {m.shadow_of!r} is {what}; a shadow follows one of {models}")
        dupes = repeated(followed)
        if dupes:
            raise ValueError(f"models: one shadow per model; {', '.join(dupes)} has several")

    @property
    def model_entries(self) -> tuple[ModelEntry, ...]:
        """The models the daemon runs (shadows included), in config order: the [[models]] tables, or [model] with
        id "default"."""
        if self.models:
            return tuple(self.models)
        return (ModelEntry(id=DEFAULT_MODEL_ID, **self.model.model_dump()),)

    @property
    def production_models(self) -> tuple[ModelEntry, ...]:
        """The models cameras' frames go to (every model but the shadows)."""
        return tuple(m for m in self.model_entries if m.shadow_of is None)

    def model_of(self, camera: CameraConfig) -> str:
        """The id of the model a camera's frames go to: its `model`, else the first model (not a shadow)."""
        return camera.model or self.production_models[0].id

    @model_validator(mode="after")
    def _no_shared_ports(self) -> Settings:
        """Two sockets of the daemon on one port: caught here, not as a bind failure after the model loaded."""
        if self.ui.enabled and self.ui.port and self.ui.port == self.metrics.port and _same_host(self.ui.host, self.metrics.host):
            raise ValueError(f"ui.port {self.ui.port} is metrics.port too: the live view and /metrics need a port each")
        if self.replay.endpoint and _same_endpoint(self.replay.endpoint, self.publish.endpoint):
            raise ValueError(
                f"replay.endpoint {self.replay.endpoint!r} is publish.endpoint too: the replay service needs a port of its own"
            )
        for other in ("publish", "replay"):
            theirs = getattr(self, other).endpoint
            if self.trigger.endpoint and theirs and _same_endpoint(self.trigger.endpoint, theirs):
                raise ValueError(
                    f"trigger.endpoint {self.trigger.endpoint!r} is {other}.endpoint too: "
                    "the trigger service needs a port of its own"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment over the file (handed in as init kwargs by load_settings).
        return env_settings, init_settings


_ANY_HOST = {"0.0.0.0", "::", "*", ""}


def _same_host(a: str, b: str) -> bool:
    """Whether two bind hosts can clash: the same, or one of them every interface."""
    return a == b or a in _ANY_HOST or b in _ANY_HOST


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two ZeroMQ bind endpoints name one address (a port 0 or * is any free one: never the same)."""
    if a.startswith("ipc://") or b.startswith("ipc://"):
        return a == b
    (host_a, _, port_a), (host_b, _, port_b) = a[6:].rpartition(":"), b[6:].rpartition(":")
    return port_a == port_b and port_a not in ("0", "*") and _same_host(host_a, host_b)


def reload_table() -> dict[str, Reload]:
    """{"section.key": how a reload treats it} for every key outside [[cameras]] and [[models]], in config order, from the
    fields' declarations. A key declared without one needs a restart (the safe default)."""
    table = {}
    for section, field in Settings.model_fields.items():
        if section in ("cameras", "models"):  # tables: [[models]] keys are classified as [model]'s
            continue
        for key, info in cast(type[BaseModel], field.annotation).model_fields.items():  # a section's model
            table[f"{section}.{key}"] = reload_of(info) or Reload.RESTART
    return table


def config_env_names() -> list[str]:
    """Every INSPECTD_* variable that sets configuration: a whole section as JSON, or one key of it."""
    return env_names(Settings)


def _config_env() -> dict[str, str]:
    """The INSPECTD_* configuration variables that are set, by upper-case name (they match case-insensitively)."""
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX) and k.upper() not in NON_CONFIG_ENV}


def _warn_unknown_env(env: dict[str, str]) -> None:
    """A variable whose section does not exist is ignored by pydantic-settings: say so, with the closest name."""
    for name in sorted(env):
        if env_path(name)[0] not in Settings.model_fields:
            hint = (
                closest(name, config_env_names() + sorted(NON_CONFIG_ENV))
                or "; configuration variables are INSPECTD_<SECTION>__<KEY>"
            )
            log.warning("%s is not an inspectd variable and is ignored%s", name, hint)


def _check_env_json(env: dict[str, str]) -> None:
    """The variables that hold JSON (INSPECTD_<SECTION>, INSPECTD_CAMERAS, and INSPECTD_<SECTION>__<KEY> of a
    table or list key, e.g. INSPECTD_UI__BASIC_AUTH_USERS): a ConfigError naming the variable if one does not
    hold JSON of the right shape (pydantic-settings would name the section, or silently ignore `null`)."""
    for name, value in sorted(env.items()):
        path = env_path(name)
        section = Settings.model_fields.get(path[0])
        if section is None or len(path) > 2:
            continue
        if len(path) == 1:
            kind: type = list if path[0] in ("cameras", "models") else dict
            want = (
                'a JSON list of camera tables, e.g. [{"id": "cam1", "url": "rtsp://..."}]'
                if kind is list
                else f"a JSON object of [{path[0]}] keys (or set one key as {name}__KEY)"
            )
        else:
            model = section_model(section.annotation)
            field = model.model_fields.get(path[1]) if model is not None else None
            origin = _container(field.annotation) if field is not None else None
            if origin is None:
                continue  # a plain value: pydantic reports it under this name
            kind = dict if origin is dict else list
            want = f"a JSON {'object' if kind is dict else 'list'}"
        _parse_json(name, value, kind, want)


def _container(annotation: object) -> type | None:
    """dict, list or tuple when a field holds one (Optional too: pydantic-settings reads it as JSON), else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = {_container(arg) for arg in typing.get_args(annotation)} - {None}
        return found.pop() if len(found) == 1 else None
    return origin if origin in (dict, list, tuple) else None


def _parse_json(name: str, value: str, kind: type, want: str) -> None:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON ({getattr(exc, 'msg', exc)}); expected {want}") from None
    except RecursionError:  # a value nested thousands deep: nothing the config can hold
        raise ConfigError(f"{name}: JSON nested too deeply; expected {want}") from None
    if not isinstance(parsed, kind):
        raise ConfigError(f"{name}: {type(parsed).__name__ if parsed is not None else 'null'} given; expected {want}")


def load_settings(path: Path | None) -> Settings:
    """Read the TOML file (None: defaults only), apply INSPECTD_* env overrides, validate; ConfigError in one line."""
    data = resolve_paths(read_toml(path), Settings, path.resolve().parent) if path is not None else {}
    where = str(path) if path is not None else ""
    prefix = f"{where}: " if where else ""
    private = sorted(k for k in data if k.startswith("_"))  # BaseSettings would take these as its own options
    if private:
        raise ConfigError(prefix + "; ".join(f"{k}: unknown key" for k in private))
    env = _config_env()
    _warn_unknown_env(env)
    _check_env_json(env)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc.errors(include_url=False), env, where, Settings)) from None
    except SettingsError as exc:  # a variable pydantic-settings cannot parse (the JSON ones are checked above)
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{found[1].upper()}" if found else f"{ENV_PREFIX}*"
        raise ConfigError(f"{name}: cannot parse the value: {exc}") from None
    if path is not None:
        check_config_file(path, holds_secrets=_holds_passwords(data))
    if not settings.cameras:
        source = origin(("cameras",), env)
        raise ConfigError(
            (f"{source}: " if source else prefix) + "cameras: no [[cameras]] configured; the daemon needs at least one camera"
        )
    problems = _missing_paths(settings)
    if problems:
        raise ConfigError(prefix + "; ".join(problems))
    return settings


def _missing_paths(settings: Settings) -> list[str]:
    """Files and folders the config names that are not there (or are the wrong kind): a daemon started on
    them would report ready while its camera retries "no such file" forever, or fail at the first defect."""
    problems = []
    for cam in settings.cameras:
        scheme, sep, _ = (cam.url or "").partition("://")
        if cam.url is None or (sep and scheme not in ("file", "dir")):
            continue  # a stream, device or pipeline: it may come up later, and the daemon retries
        parts = urlsplit(cam.url)  # as the sources read them: dir:///srv/x?fps=2, file:///v.mp4, /v.mp4
        path = Path(unquote(parts.netloc + parts.path)) if sep else Path(cam.url)
        if scheme == "dir" and not path.is_dir():
            problems.append(f"cameras[{cam.id}].url: {cam.url!r}: no such folder")
        elif scheme != "dir" and not path.exists():
            problems.append(f"cameras[{cam.id}].url: {cam.url!r}: no such file or folder")
    if settings.archive.dir and Path(settings.archive.dir).exists() and not Path(settings.archive.dir).is_dir():
        problems.append(f"archive.dir: {settings.archive.dir!r} is a file, not a folder")
    return problems


_PASSWORD_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # scheme://user:password@host


def _holds_passwords(data: dict) -> bool:
    """The file (not the environment) has a camera URL or pipeline with a password in it
    (rtsp://user:pass@..., rtspsrc user-pw=...)."""
    cams = data.get("cameras")
    cams = cams if isinstance(cams, list) else []
    texts = [v for c in cams if isinstance(c, dict) for k, v in c.items() if k in ("url", "pipeline") and isinstance(v, str)]
    return any(_PASSWORD_IN_URL.search(t) or "user-pw=" in t for t in texts)
