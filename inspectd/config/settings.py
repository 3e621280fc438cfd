"""The whole daemon configuration: one model per TOML section, env overrides `INSPECTD_<SECTION>__<KEY>`.

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
from pathlib import Path
from typing import cast

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from inspectd.config.base import Reload, reload_of, repeated
from inspectd.config.cameras import CameraConfig
from inspectd.config.daemon import DaemonConfig
from inspectd.config.loading import ENV_PREFIX, closest, env_names, env_path, format_errors, origin, read_toml, resolve_paths
from inspectd.config.model import ModelConfig
from inspectd.config.outputs import ArchiveConfig, MetricsConfig, PublishConfig, ReplayConfig, UiConfig
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
    batching: BatchingConfig = BatchingConfig()
    cameras: list[CameraConfig] = Field(
        default_factory=list, description="one [[cameras]] table per camera; load_settings requires at least one"
    )
    postprocess: PostprocessConfig = PostprocessConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    replay: ReplayConfig = ReplayConfig()
    archive: ArchiveConfig = ArchiveConfig()
    ui: UiConfig = UiConfig()
    daemon: DaemonConfig = DaemonConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        dupes = repeated([c.id for c in cameras])
        if dupes:
            raise ValueError(f"camera ids must be unique; repeated: {', '.join(dupes)}")
        return cameras

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment over the file (handed in as init kwargs by load_settings).
        return env_settings, init_settings


def reload_table() -> dict[str, Reload]:
    """{"section.key": how a reload treats it} for every key outside [[cameras]], in config order, from the
    fields' declarations. A key declared without one needs a restart (the safe default)."""
    table = {}
    for section, field in Settings.model_fields.items():
        if section == "cameras":
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
    """INSPECTD_<SECTION> and INSPECTD_CAMERAS hold JSON: a ConfigError naming the variable if they do not."""
    for section in Settings.model_fields:
        name = f"{ENV_PREFIX}{section.upper()}"
        if name not in env:
            continue
        try:
            json.loads(env[name])
        except ValueError as exc:
            want = (
                'a JSON list of camera tables, e.g. [{"id": "cam1", "url": "rtsp://..."}]'
                if section == "cameras"
                else f"a JSON object of [{section}] keys (or set one key as {name}__KEY)"
            )
            raise ConfigError(f"{name}: not valid JSON ({getattr(exc, 'msg', exc)}); expected {want}") from None


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
    return settings


_PASSWORD_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # scheme://user:password@host


def _holds_passwords(data: dict) -> bool:
    """The file (not the environment) has a camera URL or pipeline with a password in it
    (rtsp://user:pass@..., rtspsrc user-pw=...)."""
    cams = data.get("cameras")
    cams = cams if isinstance(cams, list) else []
    texts = [v for c in cams if isinstance(c, dict) for k, v in c.items() if k in ("url", "pipeline") and isinstance(v, str)]
    return any(_PASSWORD_IN_URL.search(t) or "user-pw=" in t for t in texts)
