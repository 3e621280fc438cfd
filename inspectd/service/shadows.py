"""`inspectd shadow report` and `inspectd shadow promote`: what a shadow model measured, and making it production.

    reports = shadow_reports(load_settings(path))      # one per shadow in the config, from [archive] dir
    print(format_reports(reports))
    change = promote(path, "top")                      # the config rewritten: top runs its shadow's file
    # then `systemctl reload inspectd`: the reload swaps the model in one assignment (docs/models.md)

The measurements are the daemon's (`inspectd.pipeline.shadow`): a summary per pair of model files under
`[archive] dir/.shadow/MODEL/SHADOW/`, carried across restarts while both files stay the same. Promotion
edits the config file (comments and layout kept, tomlkit): the production table takes the shadow's file and
its verdict keys (threshold, mask_rule, mask_threshold: the ones the shadow was measured with), the shadow's
table goes, the new file is checked as the daemon would read it before it replaces the old one (kept beside
it as FILE.before-promote).
"""

from __future__ import annotations

__all__ = ["ShadowReport", "shadow_reports", "format_reports", "Promotion", "promote"]

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from inspectd.config import Settings, load_settings
from inspectd.errors import ConfigError, NoInputError
from inspectd.model.deployable import model_sha256, resolve_model_path
from inspectd.pipeline.shadow import store_dir

VERDICT_KEYS = ("threshold", "mask_rule", "mask_threshold")  # what decides a verdict: promoted with the file


@dataclass(frozen=True)
class ShadowReport:
    model: str
    shadow: str
    folder: Path  # where the measurements and disagreements are
    summary: dict | None  # None: nothing measured yet with these two files

    @property
    def disagreements(self) -> Path:
        return self.folder / "disagreements"


def _sha(path: str) -> str:
    resolved = resolve_model_path(path)
    if not resolved.exists():
        raise NoInputError(f"{path}: no such model file")
    return model_sha256(resolved)


def shadow_reports(settings: Settings) -> list[ShadowReport]:
    """The measurements of every shadow the config names (ConfigError without shadows or without an archive)."""
    shadows = [m for m in settings.model_entries if m.shadow_of is not None]
    if not shadows:
        raise ConfigError("no [[models]] table has shadow_of: there is no shadow model to report on")
    if not settings.archive.dir:
        raise ConfigError("[archive] dir is empty: a shadow's measurements are kept in the archive")
    entries = {m.id: m for m in settings.model_entries}
    out = []
    for shadow in shadows:
        model = entries[str(shadow.shadow_of)]
        folder = store_dir(Path(settings.archive.dir), model.id, shadow.id, _sha(model.path), _sha(shadow.path))
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except FileNotFoundError:
            summary = None
        except (OSError, ValueError) as exc:
            raise NoInputError(f"{folder / 'summary.json'}: cannot read it: {exc}") from None
        out.append(ShadowReport(model.id, shadow.id, folder, summary))
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_reports(reports: list[ShadowReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"shadow {r.shadow} of model {r.model}")
        if r.summary is None:
            lines += [f"  nothing measured yet with these two model files ({r.folder})", ""]
            continue
        a = r.summary["agreement"]
        c = a["confusion"]
        lines += [
            f"  files     production {r.summary['production_sha256'][:12]}, shadow {r.summary['shadow_sha256'][:12]}; "
            f"last update {r.summary['updated_at']}",
            f"  frames    {a['frames']} compared, verdicts agree on {_pct(a['agreement'])}",
            "                         shadow defect   shadow ok",
            f"  production defect      {c['defect/defect']:>13}   {c['defect/ok']:>9}",
            f"  production ok          {c['ok/defect']:>13}   {c['ok/ok']:>9}",
            f"  scores    correlation {_num(a['score_correlation'])}",
            f"  regions   mean IoU {_num(a['region_iou_mean'])} on {a['region_iou_frames']} frames both call defective",
            f"  skipped   {a['skipped']['busy']} (its queue full), {a['skipped']['yield']} (production frames waiting)",
            f"  disagreements {a['disagreements']}; the latest kept for review in {r.disagreements}",
            f"  promote it: inspectd shadow promote {r.model} --config FILE, then systemctl reload inspectd",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


@dataclass(frozen=True)
class Promotion:
    model: str
    shadow: str
    old_path: str
    new_path: str
    backup: Path | None  # None: a dry run, nothing written
    text: str  # the new config


def promote(config: Path, model: str, dry_run: bool = False) -> Promotion:
    """Rewrite `config` so that model `model` runs its shadow's file, with the shadow's verdict keys, and the
    shadow's table is gone. Checked as the daemon reads a config before anything is replaced."""
    import tomlkit

    if "INSPECTD_MODELS" in {k.upper() for k in os.environ}:
        raise ConfigError("INSPECTD_MODELS is set: the models come from the environment, not the file; promote there")
    load_settings(config)  # the config as it is must be valid
    try:
        doc = tomlkit.parse(config.read_text())
    except OSError as exc:
        raise NoInputError(f"{config}: {exc.strerror or exc}") from None
    tables = doc.get("models")
    if not tables:
        raise ConfigError(f"{config}: no [[models]] tables: a shadow needs them (docs/models.md)")
    production = next((t for t in tables if t.get("id") == model and t.get("shadow_of") is None), None)
    shadow = next((t for t in tables if t.get("shadow_of") == model), None)
    if production is None or shadow is None:
        ids = ", ".join(str(t.get("shadow_of")) for t in tables if t.get("shadow_of") is not None) or "none"
        raise ConfigError(f"{config}: model {model!r} has no shadow (models with one: {ids})")
    old_path, new_path = str(production.get("path", "builtin:demo")), str(shadow.get("path", "builtin:demo"))
    production["path"] = new_path
    for key in VERDICT_KEYS:
        if key in shadow:
            production[key] = shadow[key]
        elif key in production:
            del production[key]  # the shadow was measured with the file's own: so is the promoted model
    tables.remove(shadow)
    text = tomlkit.dumps(doc)
    try:
        check = _private_copy(config, f".{config.name}.promote-check", text)
        try:
            load_settings(check)  # as the daemon will read it (relative paths from the same folder)
        finally:
            check.unlink(missing_ok=True)
        if dry_run:
            return Promotion(model, str(shadow["id"]), old_path, new_path, None, text)
        backup = config.with_name(config.name + ".before-promote")
        shutil.copy2(config, backup)
        _keep_owner(config, backup)
        os.replace(_private_copy(config, f".{config.name}.promote", text), config)
    except OSError as exc:
        raise ConfigError(f"{config}: cannot write beside it: {exc.strerror or exc} (run as the config's owner)") from None
    return Promotion(model, str(shadow["id"]), old_path, new_path, backup, text)


def _private_copy(config: Path, name: str, text: str) -> Path:
    """`text` in a new file beside `config`, created 0600, then given the config's mode and owner, synced."""
    path = config.with_name(name)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secrets (camera passwords) never readable
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(config, path)
        _keep_owner(config, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _keep_owner(config: Path, path: Path) -> None:
    """The config's owner and group (root:inspectd 0640: the daemon's user must still read it)."""
    st = config.stat()
    if (path.stat().st_uid, path.stat().st_gid) != (st.st_uid, st.st_gid):
        os.chown(path, st.st_uid, st.st_gid)
