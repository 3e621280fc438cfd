"""The daemon's configuration: one model per TOML section, each setting declared once (`inspectd.config.base`).

A leaf below every stage: sources, pipeline, outputs and service import it; it imports only the
model file's own vocabulary (the mask rule, the bundled model's name) and the foundation modules.

    settings = load_settings(Path("/etc/inspectd/config.toml"))
    settings.model.threshold, settings.cameras[0].url, reload_table()["model.threshold"]
"""

from inspectd.config.base import Reload, Section, setting
from inspectd.config.cameras import CameraConfig
from inspectd.config.daemon import DaemonConfig
from inspectd.config.loading import load_toml_model
from inspectd.config.model import DEFAULT_MODEL_ID, ModelConfig, ModelEntry
from inspectd.config.outputs import (
    ArchiveConfig,
    CurveServerConfig,
    MetricsConfig,
    PublishConfig,
    ReplayConfig,
    TriggerConfig,
    UiConfig,
    WebServerConfig,
)
from inspectd.config.pipeline import BatchingConfig, EpisodesConfig, PostprocessConfig
from inspectd.config.settings import DEFAULT_CONFIG, NON_CONFIG_ENV, Settings, config_env_names, load_settings, reload_table

__all__ = [
    "Reload",
    "Section",
    "setting",
    "CameraConfig",
    "DaemonConfig",
    "load_toml_model",
    "ModelConfig",
    "ModelEntry",
    "DEFAULT_MODEL_ID",
    "ArchiveConfig",
    "CurveServerConfig",
    "MetricsConfig",
    "PublishConfig",
    "ReplayConfig",
    "TriggerConfig",
    "UiConfig",
    "WebServerConfig",
    "BatchingConfig",
    "EpisodesConfig",
    "PostprocessConfig",
    "DEFAULT_CONFIG",
    "NON_CONFIG_ENV",
    "Settings",
    "config_env_names",
    "load_settings",
    "reload_table",
]
