"""`posttrain report RUN_DIR`: one self-contained HTML page of a pipeline run, finished or running.

    posttrain report runs/tiny                  # -> runs/tiny/report.html (opens offline: no CDN, no script)

The page: the stage graph drawn as a picture (waves left to right, rounds and branches, each stage
coloured by its status), each stage's curves from metrics.jsonl (loss, lr, grad norm, reward, KL,
accuracy per verifier, reverse KL, ...), the before / after table (held-out accuracy, preference
accuracy, rewards), data counts, timings and tokens/s, and links to each stage's model directory and
log. Read from the run directory alone (resolved.yaml, manifests, metrics.jsonl); no torch.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from posttrain_cli.errors import UserError

STATUS_COLOURS = {"completed": "#2e7d32", "running": "#1565c0", "failed": "#c62828", "stopped": "#ef6c00",
                  "pending": "#9e9e9e"}
# Curves drawn when a stage logs them, in this order; every accuracy/<verifier> and reverse KL too.
CURVES = ["loss", "lr", "grad_norm", "reward", "kl", "reward_margin", "accuracy", "heldout_reverse_kl",
          "reverse_kl", "entropy", "response_length", "tokens_per_s"]
LINE = "#1f77b4"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect(run_dir: Path) -> dict:
    """Everything the page shows, as plain data (tests read it)."""
    import yaml

    from posttrain_cli.pipeline import graph

    run_dir = Path(run_dir)
    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        raise UserError(f"{run_dir}: not a posttrain run directory (no resolved.yaml)")
    try:
        run = yaml.safe_load(resolved.read_text())
        nodes = graph.build(run)
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{resolved}: unreadable ({type(e).__name__}: {e}); run the same `posttrain run` "
                        f"command to write it again") from None
    wave: dict[str, int] = {}
    stages = []
    for node in nodes:
        wave[node.name] = 1 + max((wave[d] for d in node.deps), default=0)
        d = run_dir / node.name
        man = _read_json(d / "manifest.json") or {}
        metrics = man.get("metrics") or {}
        rows = _rows(d / "metrics.jsonl")
        series = {}
        keys = [k for k in CURVES if any(k in r for r in rows)]
        keys += sorted({k for r in rows for k in r if k.startswith(("accuracy/", "heldout_accuracy/"))} - set(keys))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get("step"))]
            if pts:
                series[key] = pts
        speeds = [r["tokens_per_s"] for r in rows if _finite(r.get("tokens_per_s"))]
        stages.append({
            "name": node.name, "kind": node.kind, "wave": wave[node.name], "deps": list(node.deps),
            "status": man.get("status", "pending"), "error": man.get("error"),
            "seconds": (man.get("timings") or {}).get("seconds"),
            "tokens_per_s": metrics.get("tokens_per_s") if _finite(metrics.get("tokens_per_s"))
            else (sum(speeds) / len(speeds) if speeds else None),
            "steps": len(rows), "series": series, "before_after": _before_after(metrics),
            "data": _data_counts(metrics.get("data")),
            "model": (d / "model") if (d / "model").is_dir() else None,
            "log": (d / "logs" / "rank0.log") if (d / "logs" / "rank0.log").is_file() else None,
        })
    return {"name": run.get("name", run_dir.name), "run_dir": run_dir.resolve(), "stages": stages}


def _before_after(m: dict) -> list[tuple[str, float | None, float | None]]:
    """(what, before, after) rows: held-out generation accuracy, preference accuracy, rewards."""
    out = []
    ev = m.get("eval") or {}
    if ev:
        b, a = ev.get("before") or {}, ev.get("after") or {}
        out.append((f"eval accuracy ({a.get('verifier') or b.get('verifier') or 'verifier'})",
                    b.get("accuracy"), a.get("accuracy")))
        if "reward" in a or "reward" in b:
            out.append(("eval reward-model score", b.get("reward"), a.get("reward")))
    held = m.get("heldout") or {}
    if held:
        b, a = held.get("before") or {}, held.get("after") or {}
        out.append(("held-out preference accuracy", b.get("accuracy"), a.get("accuracy")))
        for key, what in (("reverse_kl", "held-out reverse KL"), ("margin", "held-out reward margin")):
            if key in a or key in b:
                out.append((what, b.get(key), a.get(key)))
    if "reward_start" in m or "reward_end" in m:
        out.append(("training reward", m.get("reward_start"), m.get("reward_end")))
    return out


def _data_counts(data) -> dict[str, int]:
    """rows / examples / truncated / dropped, summed over a stage's data parts."""
    if not isinstance(data, dict):
        return {}
    parts = [v for v in data.values() if isinstance(v, dict)] or [data]
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, int) and not isinstance(v, bool):
                name = "dropped" if k.startswith("dropped") else "truncated" if "truncated" in k else k
                out[name] = out.get(name, 0) + v
    return {k: out[k] for k in ("rows", "examples", "truncated", "dropped", "tokens") if k in out}


# ------------------------------------------------------------------ drawing

def _graph_svg(stages: list[dict]) -> str:
    """Waves left to right, a wave's stages top to bottom, an arrow from each input."""
    box_w, box_h, gap_x, gap_y = 170, 46, 60, 18
    cols: dict[int, list[dict]] = {}
    for s in stages:
        cols.setdefault(s["wave"], []).append(s)
    pos = {}
    for w, col in cols.items():
        for i, s in enumerate(col):
            pos[s["name"]] = (20 + (w - 1) * (box_w + gap_x), 20 + i * (box_h + gap_y))
    width = 40 + len(cols) * (box_w + gap_x)
    height = 40 + max(len(c) for c in cols.values()) * (box_h + gap_y)
    parts = [f'<svg class="graph" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for s in stages:
        x, y = pos[s["name"]]
        for d in s["deps"]:
            dx, dy = pos[d]
            parts.append(f'<line x1="{dx + box_w}" y1="{dy + box_h / 2}" x2="{x - 2}" y2="{y + box_h / 2}" '
                         f'stroke="#555" stroke-width="1.5" marker-end="url(#arrow)"/>')
    for s in stages:
        x, y = pos[s["name"]]
        colour = STATUS_COLOURS.get(s["status"], STATUS_COLOURS["pending"])
        parts.append(f'<g class="stage" data-stage="{html.escape(s["name"])}" data-status="{s["status"]}">'
                     f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{colour}"/>'
                     f'<text x="{x + 8}" y="{y + 19}" fill="#fff" font-size="14" font-weight="bold">'
                     f'{html.escape(s["name"])}</text>'
                     f'<text x="{x + 8}" y="{y + 37}" fill="#fff" font-size="12">{html.escape(s["kind"])} · '
                     f'{s["status"]}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _chart_svg(stage: str, key: str, pts: list[tuple]) -> str:
    w, h, pad_l, pad_b, pad_t = 300, 150, 62, 22, 22
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * (w - pad_l - 8)  # noqa: E731
    sy = lambda y: pad_t + (1 - (y - y0) / (y1 - y0)) * (h - pad_t - pad_b)  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{LINE}"/>' for x, y in pts) \
        if len(pts) <= 40 else ""
    return (f'<svg class="chart" data-stage="{html.escape(stage)}" data-metric="{html.escape(key)}" '
            f'data-points="{len(pts)}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff" stroke="#ddd"/>'
            f'<text x="{pad_l}" y="15" font-size="13" font-weight="bold">{html.escape(key)}</text>'
            f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - 8}" y2="{h - pad_b}" stroke="#999"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{h - pad_b}" stroke="#999"/>'
            f'<text x="{pad_l - 4}" y="{pad_t + 4}" font-size="10" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{pad_l - 4}" y="{h - pad_b}" font-size="10" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{pad_l}" y="{h - 6}" font-size="10">step {x0:g}</text>'
            f'<text x="{w - 8}" y="{h - 6}" font-size="10" text-anchor="end">{x1:g}</text>'
            f'<polyline points="{line}" fill="none" stroke="{LINE}" stroke-width="2"/>{dots}</svg>')


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct and _finite(v):
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else html.escape(str(v))


def render(data: dict) -> str:
    stages = data["stages"]
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>",
           f"<title>posttrain · {esc(data['name'])}</title><style>",
           "body{font-family:system-ui,sans-serif;margin:24px;color:#222} h2{margin-top:32px}"
           "table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}"
           "th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}"
           ".charts{display:flex;flex-wrap:wrap;gap:10px} .status{color:#fff;padding:1px 6px;border-radius:4px}"
           ".stage-section{border-top:1px solid #eee;padding-top:8px}",
           "</style></head><body>",
           f"<h1>{esc(data['name'])}</h1><p>{esc(str(data['run_dir']))}</p>",
           "<h2>Stage graph</h2>", _graph_svg(stages),
           "<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>status</th><th>steps</th><th>time (s)</th>"
           "<th>tokens/s</th><th>rows</th><th>truncated</th><th>dropped</th><th>model</th><th>log</th></tr>"]
    for s in stages:
        colour = STATUS_COLOURS.get(s["status"], STATUS_COLOURS["pending"])
        secs = f"{s['seconds']:.1f}" if _finite(s["seconds"]) else "–"
        link = lambda p, text: f"<a href='{Path(p).resolve().as_uri()}'>{text}</a>" if p else "–"  # noqa: E731
        out.append(f"<tr><td><a href='#stage-{esc(s['name'])}'>{esc(s['name'])}</a></td><td>{esc(s['kind'])}</td>"
                   f"<td><span class='status' style='background:{colour}'>{s['status']}</span></td>"
                   f"<td>{s['steps'] or '–'}</td><td>{secs}</td>"
                   f"<td>{_fmt(round(s['tokens_per_s'])) if s['tokens_per_s'] else '–'}</td>"
                   f"<td>{_fmt(s['data'].get('rows'))}</td><td>{_fmt(s['data'].get('truncated'))}</td>"
                   f"<td>{_fmt(s['data'].get('dropped'))}</td><td>{link(s['model'], 'model/')}</td>"
                   f"<td>{link(s['log'], 'rank0.log')}</td></tr>")
    out.append("</table>")
    rows = [(s["name"], *r) for s in stages for r in s["before_after"]]
    if rows:
        out.append("<h2>Before and after</h2><table><tr><th>stage</th><th>measure</th><th>before</th>"
                   "<th>after</th></tr>")
        out += [f"<tr><td>{esc(n)}</td><td style='text-align:left'>{esc(w)}</td>"
                f"<td>{_fmt(b, 'accuracy' in w)}</td><td>{_fmt(a, 'accuracy' in w)}</td></tr>" for n, w, b, a in rows]
        out.append("</table>")
    for s in stages:
        out.append(f"<div class='stage-section' id='stage-{esc(s['name'])}'><h2>{esc(s['name'])} "
                   f"<small>({esc(s['kind'])}, {s['status']})</small></h2>")
        if s["error"]:
            out.append(f"<p style='color:#c62828'>{esc(str(s['error']))}</p>")
        if s["series"]:
            out.append("<div class='charts'>" + "".join(_chart_svg(s["name"], k, pts) for k, pts in s["series"].items())
                       + "</div>")
        else:
            out.append("<p>No per-step metrics" + (" yet." if s["status"] in ("pending", "running") else ".") + "</p>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write(run_dir: Path, out: Path | None = None) -> Path:
    """The page at `out` (default RUN_DIR/report.html), written atomically."""
    out = Path(out) if out else Path(run_dir) / "report.html"
    text = render(collect(run_dir))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out
