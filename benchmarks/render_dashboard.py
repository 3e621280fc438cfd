"""Render the Grafana dashboard's panels from a live Prometheus into a PNG (what the operator sees).

    python benchmarks/render_dashboard.py http://127.0.0.1:9090 --minutes 30 --out docs/img/dashboard.png

Runs every query of deploy/grafana/inspectd.json against Prometheus' HTTP API (query_range for
graphs, instant queries for stats, bar gauges and tables) with the dashboard's variables filled in
like Grafana fills them, and draws each panel with matplotlib at its place on the dashboard's
24-column grid. It needs no Grafana; it is an approximation of Grafana's rendering, not a copy.
Needs matplotlib (the `toolkit` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BG, PANEL_BG, FG, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d", "#fade2a"]


# ------------------------------------------------------------------------------------------ Prometheus
class Prom:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body["status"] != "success":
            raise RuntimeError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    def instant(self, expr: str, at: float) -> list[dict]:
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})


def grafana_regex(values: list[str]) -> str:
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def render(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], expr)


def legend(fmt: str, metric: dict) -> str:
    if not fmt or fmt == "__auto":
        labels = {k: v for k, v in metric.items() if k != "__name__"}
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


# ------------------------------------------------------------------------------------------ units
def fmt_value(v: float, unit: str, decimals: int | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if unit == "percentunit":
        return f"{v * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if unit == "bytes":
        for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(v) >= div:
                return f"{v / div:.2f} {name}"
        return f"{v:.0f} B"
    if unit == "dtdurations":
        s = int(v)
        parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
        return " ".join(f"{n} {u}" for n, u in parts if n)[:12] or "0 s"
    d = decimals if decimals is not None else (0 if float(v).is_integer() else 2)
    return f"{v:.{d}f}"


def axis_formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    if unit == "percentunit":
        return FuncFormatter(lambda v, _: f"{v * 100:.0f}%")
    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.1f} s")
    if unit == "bytes":
        return FuncFormatter(lambda v, _: f"{v / 2**20:.0f} MiB")
    return FuncFormatter(lambda v, _: f"{v:g}")


def to_float(s: str) -> float:
    return float(s)


# ------------------------------------------------------------------------------------------ panels
class Renderer:
    def __init__(self, prom: Prom, variables: dict[str, str], start: float, end: float, step: float):
        self.prom, self.vars, self.start, self.end, self.step = prom, variables, start, end, step

    def q(self, target: dict):
        expr = render(target["expr"], self.vars)
        if target.get("instant"):
            return self.prom.instant(expr, self.end)
        return self.prom.range(expr, self.start, self.end, self.step)

    def draw(self, ax, panel: dict) -> None:
        getattr(self, "draw_" + panel["type"].replace("-", "_"), self.draw_unknown)(ax, panel)

    def _style(self, ax, panel):
        ax.set_facecolor(PANEL_BG)
        for s in ax.spines.values():
            s.set_color(GRID)
        ax.tick_params(colors=FG, labelsize=6)
        ax.set_title(panel["title"], color=FG, fontsize=8, loc="left", pad=3)

    def _time_axis(self, ax, panel, grid=True):
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.set_xlim(self.start, self.end)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=max(2, panel["gridPos"]["w"] // 2)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: datetime.fromtimestamp(v).strftime("%H:%M:%S")))
        if grid:
            ax.grid(color=GRID, linewidth=0.5)
        ax.set_axisbelow(True)

    def draw_timeseries(self, ax, panel):
        self._style(ax, panel)
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        right = None
        overrides = panel["fieldConfig"].get("overrides", [])
        n = 0
        for target in panel["targets"]:
            for series in sorted(self.q(target), key=lambda s: legend(target.get("legendFormat"), s["metric"])):
                name = legend(target.get("legendFormat"), series["metric"])
                xs = [to_float(t) for t, _ in series["values"]]
                ys = [to_float(v) for _, v in series["values"]]
                style, axis = {}, ax
                for o in overrides:
                    if o["matcher"]["id"] == "byRegexp" and re.fullmatch(o["matcher"]["options"], name):
                        for prop in o["properties"]:
                            if prop["id"] == "custom.lineStyle":
                                style["linestyle"] = "--"
                            if prop["id"] == "custom.axisPlacement" and prop["value"] == "right":
                                right = right or ax.twinx()
                                axis = right
                axis.plot(xs, ys, color=PALETTE[n % len(PALETTE)], linewidth=1, label=name, **style)
                n += 1
        self._time_axis(ax, panel)
        ax.yaxis.set_major_formatter(axis_formatter(unit))
        if defaults.get("min") is not None:
            ax.set_ylim(bottom=defaults["min"])
        steps = defaults.get("thresholds", {}).get("steps", [])
        if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "dashed":
            for st in steps:
                if st["value"] is not None:
                    ax.axhline(st["value"], color="#f2495c", linestyle="--", linewidth=0.8)
        if right is not None:
            right.tick_params(colors=FG, labelsize=6)
            lines = ax.get_lines() + right.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=5, loc="upper left", framealpha=0.3)
        elif n:
            ax.legend(fontsize=5, loc="upper left", framealpha=0.3, ncol=2 if n > 4 else 1)
        else:
            ax.text(0.5, 0.5, "No data", color=FG, ha="center", va="center", transform=ax.transAxes)

    def draw_stat(self, ax, panel):
        self._style(ax, panel)
        ax.set_xticks([]), ax.set_yticks([])
        d = panel["fieldConfig"]["defaults"]
        fields = panel["options"]["reduceOptions"].get("fields", "")
        texts = []
        for target in panel["targets"]:
            for s in self.q(target):
                v = to_float(s["value"][1]) if "value" in s else to_float(s["values"][-1][1])
                m = re.fullmatch(r"/\^?(\w+)\$?/", fields or "")
                text = s["metric"].get(m.group(1), "?") if m else fmt_value(v, d.get("unit", "short"), d.get("decimals"))
                if panel["options"].get("textMode") == "value_and_name" or len(panel["targets"]) > 1:
                    text = f"{text} {legend(target.get('legendFormat'), s['metric'])}"
                color = FG
                for st in d.get("thresholds", {}).get("steps", []):
                    if st["value"] is None or (not m and v >= st["value"]):
                        color = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830"}.get(st["color"], FG)
                texts.append((text, color))
        if not texts:
            texts = [("No data", FG)]
        size = 16 if len(texts) == 1 and len(texts[0][0]) < 10 else 10
        for i, (text, color) in enumerate(texts[:3]):
            ax.text(
                0.5,
                0.45 - (i - (len(texts[:3]) - 1) / 2) * 0.35,
                text,
                color=color,
                fontsize=size,
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontweight="bold",
            )

    def _buckets(self, target) -> list[tuple[str, float]]:
        rows = [
            (s["metric"].get("le", legend(target.get("legendFormat"), s["metric"])), to_float(s["value"][1]))
            for s in self.q(target)
        ]
        if target.get("format") == "heatmap":
            rows.sort(key=lambda r: float(r[0]))
            rows = [(le, v - (rows[i - 1][1] if i else 0.0)) for i, (le, v) in enumerate(rows)]
            rows = [(le if le != "+Inf" else "+Inf", v) for le, v in rows]
        return rows

    def draw_bargauge(self, ax, panel):
        self._style(ax, panel)
        rows = [r for t in panel["targets"] for r in self._buckets(t)]
        if panel["targets"][0].get("format") == "heatmap":
            rows = [r for r in rows if r[1] > 0] or rows[:1]
            label = panel["targets"][0].get("legendFormat", "{{le}}").replace("{{le}}", "{}")
            rows = [(label.format(le), v) for le, v in rows]
        names = [r[0] for r in rows][::-1]
        vals = [r[1] for r in rows][::-1]
        ax.barh(range(len(vals)), vals, color="#5794f2")
        ax.set_yticks(range(len(vals)), names, fontsize=6)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}", color=FG, va="center", fontsize=6)
        ax.grid(color=GRID, linewidth=0.5, axis="x")
        ax.set_axisbelow(True)

    def draw_heatmap(self, ax, panel):
        import numpy as np

        self._style(ax, panel)
        target = panel["targets"][0]
        series = self.q(target)
        if not series:
            ax.text(0.5, 0.5, "No data", color=FG, ha="center", va="center", transform=ax.transAxes)
            return
        series.sort(key=lambda s: float(s["metric"]["le"]))
        times = sorted({to_float(t) for s in series for t, _ in s["values"]})
        index = {t: i for i, t in enumerate(times)}
        cum = np.zeros((len(series), len(times)))
        for j, s in enumerate(series):
            for t, v in s["values"]:
                cum[j, index[to_float(t)]] = to_float(v)
        counts = np.diff(cum, axis=0, prepend=0).clip(min=0)
        ax.imshow(
            np.sqrt(counts),
            aspect="auto",
            origin="lower",
            cmap="Oranges",
            extent=(times[0], times[-1], 0, len(series)),
            interpolation="nearest",
        )
        les = [s["metric"]["le"] for s in series]
        ax.set_yticks([i + 0.5 for i in range(len(les))][::2], les[::2], fontsize=5)
        self._time_axis(ax, panel, grid=False)

    def draw_state_timeline(self, ax, panel):
        self._style(ax, panel)
        target = panel["targets"][0]
        series = sorted(self.q(target), key=lambda s: legend(target.get("legendFormat"), s["metric"]))
        names = []
        for i, s in enumerate(series):
            names.append(legend(target.get("legendFormat"), s["metric"]))
            pts = [(to_float(t), to_float(v)) for t, v in s["values"]]
            for (t0, v0), (t1, _) in zip(pts, pts[1:] + [(pts[-1][0] + self.step, None)]):
                ax.broken_barh([(t0, t1 - t0)], (i + 0.05, 0.9), color="#73bf69" if v0 >= 1 else "#f2495c")
        ax.set_yticks([i + 0.5 for i in range(len(names))], names, fontsize=6)
        ax.set_ylim(0, max(1, len(names)))
        self._time_axis(ax, panel, grid=False)

    def draw_table(self, ax, panel):
        self._style(ax, panel)
        ax.set_xticks([]), ax.set_yticks([])
        rows: dict[str, dict] = {}
        for target in panel["targets"]:
            for s in self.q(target):
                rows.setdefault(s["metric"].get("instance", ""), {}).update(s["metric"])
        org = next((t["options"] for t in panel.get("transformations", []) if t["id"] == "organize"), {})
        order = sorted(org.get("indexByName", {}), key=lambda k: org["indexByName"][k])
        cols = [c for c in order if any(c in r for r in rows.values())]
        header = [org.get("renameByName", {}).get(c, c) for c in cols]
        cells = [[(r.get(c, "")[:16] + "..." if len(r.get(c, "")) > 19 else r.get(c, "")) for c in cols] for r in rows.values()]
        if cells:
            table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="left")
            table.auto_set_font_size(False)
            table.set_fontsize(6)
            for cell in table.get_celld().values():
                cell.set_facecolor(PANEL_BG), cell.set_edgecolor(GRID), cell.get_text().set_color(FG)

    def draw_unknown(self, ax, panel):
        self._style(ax, panel)
        ax.text(0.5, 0.5, panel["type"], color=FG, ha="center", transform=ax.transAxes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=ROOT / "deploy" / "grafana" / "inspectd.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    ap.add_argument("--minutes", type=float, default=30, help="time range ending now (default 30)")
    ap.add_argument("--end", type=float, default=None, help="end of the range, unix seconds (default: now)")
    ap.add_argument("--instance", action="append", help="instance(s) to show (default: all, like Grafana's All)")
    ap.add_argument("--camera", action="append", help="camera(s) to show (default: all)")
    ap.add_argument("--rate-interval", default="1m", help="$__rate_interval: 4 x the scrape interval (default 1m)")
    ap.add_argument("--step", type=float, default=None, help="graph resolution in s (default: range / 300)")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prom = Prom(args.prometheus)
    dash = json.loads(args.dashboard.read_text())
    end = args.end or time.time()
    start = end - args.minutes * 60
    step = args.step or max(1.0, round(args.minutes * 60 / 300))
    range_s = f"{int(end - start)}s"
    instances = args.instance or prom.label_values("instance", "inspectd_build_info")
    variables = {
        "instance": grafana_regex(instances),
        "__rate_interval": args.rate_interval,
        "__range": range_s,
        "__interval": f"{int(step)}s",
        "datasource": "",
    }
    cameras = args.camera or prom.label_values("camera", render('inspectd_camera_up{instance=~"$instance"}', variables))
    variables["camera"] = grafana_regex(cameras)
    r = Renderer(prom, variables, start, end, step)

    panels = dash["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_px = 0.32  # inches per grid row: Grafana's rows are ~30 px, columns ~1/24 of the width
    fig = plt.figure(figsize=(18, height * unit_px + 0.6), facecolor=BG)
    top = 1 - 0.6 / (height * unit_px + 0.6)
    fig.text(
        0.01,
        1 - 0.2 / (height * unit_px + 0.6),
        f"{dash['title']}  |  instance {', '.join(instances)}  |  "
        f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M} - {datetime.fromtimestamp(end):%H:%M}  |  "
        f"rate interval {args.rate_interval}",
        color=FG,
        fontsize=10,
        va="center",
    )
    for p in panels:
        g = p["gridPos"]
        x0, w = g["x"] / 24, g["w"] / 24
        y1 = top * (1 - g["y"] / height)
        h = top * g["h"] / height
        if p["type"] == "row":
            fig.text(x0 + 0.005, y1 - h / 2, p["title"], color=FG, fontsize=9, fontweight="bold", va="center")
            continue
        pad_x, pad_top, pad_bottom = 0.03 if p["type"] not in ("stat",) else 0.004, 0.022, 0.02
        if p["type"] in ("stat", "table"):
            pad_bottom = 0.004
        ax = fig.add_axes((x0 + pad_x, y1 - h + pad_bottom * top, w - pad_x - 0.006, h - (pad_top + pad_bottom) * top))
        try:
            r.draw(ax, p)
        except Exception as exc:  # one broken panel must not hide the others
            ax.text(0.5, 0.5, f"error: {exc}"[:80], color="#f2495c", ha="center", transform=ax.transAxes, fontsize=6)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, facecolor=BG)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
