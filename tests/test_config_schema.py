"""Each setting is declared once: the reload table, path resolution, the reference in docs/ and the example
config are derived from (or checked against) the fields of `inspectd.config`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
from pydantic import BaseModel

from inspectd.config import Reload, Settings, load_settings, reload_table
from inspectd.config.base import is_path_field, reload_of
from inspectd.config.loading import resolve_paths, section_model
from inspectd.config.reference import markdown

ROOT = Path(__file__).resolve().parents[1]
# Keys config.example.toml sets to another value than the daemon's default, on purpose (each says so in its comment).
EXAMPLE_DIFFERS = {"ui.enabled", "replay.endpoint"}

TABLES = ("cameras", "models")  # [[...]] sections: a list of tables


def _sections() -> dict[str, type[BaseModel]]:
    return {name: section_model(field.annotation) for name, field in Settings.model_fields.items()}


def test_every_key_outside_cameras_declares_how_a_reload_treats_it():
    undeclared = [
        f"{section}.{key}"
        for section, model in _sections().items()
        if section != "cameras"
        for key, field in model.model_fields.items()
        if reload_of(field) is None and (section, key) != ("models", "id")  # a model's id names it: no value to reload
    ]
    assert undeclared == []
    table = reload_table()
    assert table["model.cache_dir"] is Reload.ENGINE and table["postprocess.jpeg_quality"] is Reload.CONTEXT
    assert table["daemon.stuck_after_s"] is Reload.LIVE and table["publish.endpoint"] is Reload.RESTART


def test_a_relative_cache_dir_resolves_against_the_config_file(tmp_path, monkeypatch):
    """docs/daemon.md: relative paths are relative to the config file, not to the daemon's working directory."""
    conf = tmp_path / "etc" / "config.toml"
    conf.parent.mkdir()
    conf.write_text('[model]\ncache_dir = "cache"\n[[cameras]]\nid = "a"\nurl = "synthetic://"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(conf).model.cache_dir == str(tmp_path / "etc" / "cache")


def test_every_path_key_resolves_against_the_config_file(tmp_path):
    """Whatever a field's section, a `PathText` value that is relative becomes relative to the file; others stay."""
    paths = {section: [k for k, f in model.model_fields.items() if is_path_field(f)] for section, model in _sections().items()}
    assert "cache_dir" in paths["model"] and "collect_dir" in paths["ui"] and paths["cameras"] == ["url"]
    data = {
        section: ([{k: "rel/x" for k in keys}] if section in TABLES else {k: "rel/x" for k in keys})
        for section, keys in paths.items()
        if keys
    }
    data["publish"]["endpoint"] = "rel/x"  # not a path: left alone
    out = resolve_paths(data, Settings, tmp_path)
    assert out["cameras"][0]["url"] == str(tmp_path / "rel" / "x")
    for section, keys in ((s, k) for s, k in paths.items() if k):
        values = out[section][0] if section in TABLES else out[section]
        assert all(values[k] == str(tmp_path / "rel" / "x") for k in keys), section
    assert out["publish"]["endpoint"] == "rel/x"
    kept = resolve_paths({"model": {"path": "builtin:demo"}, "cameras": [{"url": "rtsp://h/s"}]}, Settings, tmp_path)
    assert kept == {"model": {"path": "builtin:demo"}, "cameras": [{"url": "rtsp://h/s"}]}


def test_the_reference_in_docs_is_the_schema():
    """docs/configuration.md is written from the schema: `python -m inspectd.config.reference > docs/configuration.md`."""
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(), (
        "docs/configuration.md is stale: run python -m inspectd.config.reference > docs/configuration.md"
    )


def _example_keys() -> dict[str, tuple[bool, str]]:
    """{"section.key": (set, value text)} of config.example.toml, commented-out keys included (set False)."""
    found: dict[str, tuple[bool, str]] = {}
    section = None
    for line in (ROOT / "config.example.toml").read_text().splitlines():
        head = re.match(r"\s*(#\s*)?\[\[?([a-z_.]+)\]\]?", line)
        if head:
            section = head[2]
            continue
        key = re.match(r"(#\s*)?([a-z_]+)\s*=\s*(.*?)\s*(#.*)?$", line)
        if key and section and f"{section}.{key[2]}" not in found:
            found[f"{section}.{key[2]}"] = (key[1] is None, key[3])
    return found


def test_the_example_config_names_every_key_with_its_default():
    example = _example_keys()
    missing, wrong = [], []
    defaults = Settings().model_dump(mode="json")
    table_defaults = {table: {k: f.default for k, f in _sections()[table].model_fields.items()} for table in TABLES}
    for section, model in _sections().items():
        for key in model.model_fields:
            name = f"{section}.{key}"
            if name not in example and not (section in ("metrics", "ui") and key == "basic_auth_users"):
                missing.append(name)
                continue
            is_set, text = example.get(name, (False, ""))
            if not is_set or name in EXAMPLE_DIFFERS or key in ("id", "url") and section in TABLES:
                continue
            value = tomllib.loads(f"v = {text}")["v"]
            default = table_defaults[section][key] if section in TABLES else defaults[section][key]
            if value != default:
                wrong.append(f"{name} = {text} (default {default!r})")
    assert missing == [] and wrong == []
    assert all(example[k][0] for k in EXAMPLE_DIFFERS)


def test_the_example_check_can_fail(monkeypatch):
    """The two checks above see a key the example lacks and a default it misstates."""
    real = _example_keys()
    monkeypatch.setattr(
        sys.modules[__name__], "_example_keys", lambda: {k: v for k, v in real.items() if k != "postprocess.jpeg_quality"}
    )
    with pytest.raises(AssertionError):
        test_the_example_config_names_every_key_with_its_default()
    monkeypatch.setattr(sys.modules[__name__], "_example_keys", lambda: {**real, "postprocess.jpeg_quality": (True, "90")})
    with pytest.raises(AssertionError):
        test_the_example_config_names_every_key_with_its_default()
