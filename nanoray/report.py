"""The miniseries report: one results table, plots and a page that shows what more compute buys.

`write_report(rows, histories, out_dir, fit=...)` writes into out_dir:

    results.csv         one row per trial: COLUMNS in this order, then busy_fraction (train_s / wall_s), then
                        the TIMINGS, PLACEMENT and per-task CORE columns (core_<task>: centered accuracy) the
                        rows carry
    bpb_vs_flops.png    final val bpb of each trial vs its training FLOPs (log x), the fit's curve if any
    loss_curves.png     train loss and val bpb vs FLOPs (tokens when no history has FLOPs), one line a trial
    core_vs_flops.png   CORE vs FLOPs, only when some trial has a CORE score
    prediction.png      with a prediction (nanoray.scaling.predict): val bpb and CORE vs FLOPs, the law that
                        answers each, its 95% band extrapolated to the targets, and each target's FLOPs
    surface.png         with a prediction: the loss surface's isoFLOP curves (loss vs params at fixed FLOPs)
                        and its compute-optimal N*(C); without a surface, the trials in (params, tokens) and why
    report.md           title, the table, the fit, the plots by relative path, a text version of the val bpb
                        plot (`text_plot`) that reads in a terminal or a diff, and with a prediction the "what it
                        takes" table, the fits and Approach 2 vs 3
    report.html         the same page, self-contained: inline CSS, the plots as base64 data URIs, no JS

Rows keep the caller's order. Missing values (None, NaN) print as "–" in the page and as an empty
cell in the CSV (NaN stays "nan": a diverged loss is not a missing one). Trials that are not "done"
stay in the table with their status and show as hollow markers. Plots go through matplotlib's Agg
canvas directly (no pyplot, no global backend switch). Every file is written to a temp sibling and
renamed, and the pages are written last, so a crash never leaves a half-written file or a page that
points at a plot not yet there.
"""

import base64
import csv
import html
import io
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanoray.storage import atomic_write

COLUMNS = ["trial", "depth", "preset", "horizon", "ratio", "flops_budget", "params", "total_params", "tokens",
           "flops", "iterations", "steps_done", "wall_s", "train_s", "gpu_hours", "cost_usd", "train_loss",
           "val_loss", "val_bpb", "core", "tok_per_s", "mfu", "checkpoint", "status"]
# Where a trial's wall time went besides its steps (seconds; the first window includes torch.compile).
TIMINGS = ["setup_s", "first_window_s", "eval_time_s"]
# Where a trial ran: the node and hostname of its last report, and every hostname it ran on, in order
# (more than one after a lost node).
PLACEMENT = ["node_id", "hostname", "hostnames"]
RESULTS, BPB_PLOT, LOSS_PLOT, CORE_PLOT = "results.csv", "bpb_vs_flops.png", "loss_curves.png", "core_vs_flops.png"
PREDICTION_PLOT, SURFACE_PLOT = "prediction.png", "surface.png"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
MISSING = "–"
DPI = 110


def write_report(rows: list[dict], histories: dict[str, list[dict]], out_dir, title: str = "nanoray miniseries",
                 fit=None, sections: dict[str, list[str]] | None = None, prediction=None) -> dict[str, Path]:
    """Writes results.csv, plots (PNG) and report.md + report.html into out_dir; returns {name: path}.

    `fit` is anything with `predict(flops) -> val bpb` and a `__str__` (nanoray.scaling's power law), or None.
    `sections`: more text at the end of the pages, {heading: bullet lines}.
    `prediction`: a nanoray.scaling.predict.Prediction (what the targets take), or None.
    """
    _check(rows)
    extra = [k for k in TIMINGS + PLACEMENT if any(k in r for r in rows)] + sorted({k for r in rows for k in r
                                                                                    if k.startswith("core_")})
    rows = [dict({k: _scalar(r.get(k)) for k in COLUMNS + extra}, busy_fraction=_busy(r)) for r in rows]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {RESULTS: _write(out / RESULTS, _csv(rows, ["busy_fraction"] + extra).encode())}

    colors = _depth_colors(rows)
    plots = {BPB_PLOT: ("val bpb vs training FLOPs", _bpb_plot(rows, colors, fit)),
             LOSS_PLOT: ("train loss and val bpb during training", _loss_plot(rows, histories, colors))}
    if any(_num(r["core"]) is not None for r in rows):
        plots[CORE_PLOT] = ("CORE vs training FLOPs", _core_plot(rows, colors))
    else:
        (out / CORE_PLOT).unlink(missing_ok=True)  # a stale plot from an earlier report of other results
    tables = {}
    if prediction is not None:
        plots[PREDICTION_PLOT] = ("what more compute buys: the fits, their 95% bands and the targets",
                                  _prediction_plot(rows, colors, prediction))
        plots[SURFACE_PLOT] = ("the loss surface: isoFLOP curves and the compute-optimal size",
                               _surface_plot(rows, colors, prediction))
        tables = _prediction_tables(prediction)
    else:
        for name in (PREDICTION_PLOT, SURFACE_PLOT):
            (out / name).unlink(missing_ok=True)
    for name, (_, png) in plots.items():
        paths[name] = _write(out / name, png)

    header, cells = _table(rows)
    summary = _summary(rows)
    fit_line = None if fit is None else f"Fit: {fit}"
    text = text_plot(rows, "val_bpb", fit)
    sections = sections or {}
    paths[REPORT_MD] = _write(out / REPORT_MD, _markdown(title, summary, header, cells, fit_line, plots, text,
                                                         sections, tables).encode())
    paths[REPORT_HTML] = _write(out / REPORT_HTML, _html(title, summary, header, cells, fit_line, plots,
                                                         sections, tables).encode())
    return paths


# ---------------------------------------------------------------------------------------------------
# Values


def _check(rows: list[dict]) -> None:
    if not rows:
        raise ValueError("rows: no trials to report")
    seen = set()
    for i, r in enumerate(rows):
        missing = [k for k in COLUMNS if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] (trial {r.get('trial')!r}): missing keys {missing}")
        if r["trial"] in seen:
            raise ValueError(f"rows[{i}]: trial {r['trial']!r} appears twice; results.csv has one row per trial")
        seen.add(r["trial"])


def _scalar(v):
    """NumPy scalars (Tune's dataframes hand them out) as plain Python values."""
    return v.item() if isinstance(v, np.generic) else v


def _num(v) -> float | None:
    """A finite-or-infinite float, or None for None, NaN and anything that is not a number."""
    if v is None or isinstance(v, (str, bool)):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _busy(r: dict) -> float | None:
    train_s, wall_s = _num(r["train_s"]), _num(r["wall_s"])
    return train_s / wall_s if train_s is not None and wall_s else None


def _csv(rows: list[dict], extra: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS + extra)
    for r in rows:
        w.writerow(["" if r[k] is None else r[k] for k in COLUMNS + extra])
    return buf.getvalue()


_write = atomic_write  # every file of the report: a temp sibling, then a rename over the old one


# ---------------------------------------------------------------------------------------------------
# The table


def _count(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _sci(x: float) -> str:
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _hours(x: float) -> str:
    return f"{x:,.2f}" if x == 0 or abs(x) >= 0.01 else f"{x:.1g}"


TABLE = [  # header, row key, formatter of a present value
    ("trial", "trial", str),
    ("depth", "depth", lambda x: f"{x:.0f}"),
    ("params", "params", _count),
    ("tokens", "tokens", _count),
    ("FLOPs", "flops", _sci),
    ("GPU-hours", "gpu_hours", _hours),
    ("cost", "cost_usd", lambda x: "$" + _hours(x)),
    ("val bpb", "val_bpb", lambda x: f"{x:.4f}"),
    ("CORE", "core", lambda x: f"{x:.4f}"),
    ("tok/s", "tok_per_s", _count),
    ("MFU", "mfu", lambda x: f"{x:.1%}"),
    ("busy %", "busy_fraction", lambda x: f"{100 * x:.1f}"),
    ("status", "status", str),
]


def _cell(v, fmt) -> str:
    if fmt is str:
        return MISSING if v is None or v == "" else str(v)
    x = _num(v)
    return MISSING if x is None else fmt(x)


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _, _ in TABLE], [[_cell(r[k], fmt) for _, k, fmt in TABLE] for r in rows]


def _summary(rows: list[dict]) -> str:
    def values(key):
        return ", ".join(dict.fromkeys(str(r[key]) for r in rows if r[key] is not None)) or MISSING
    done = sum(r["status"] == "done" for r in rows)
    return (f"{len(rows)} trial{'s' * (len(rows) != 1)} ({done} done), preset {values('preset')}, "
            f"horizon {values('horizon')}. params: scaling parameters; busy %: time inside training steps "
            "/ trial wall time.")


# ---------------------------------------------------------------------------------------------------
# Plots


def text_plot(rows: list[dict], key: str = "val_bpb", fit=None, width: int = 64, height: int = 16) -> str:
    """`key` vs training FLOPs (log x) as text: each trial a digit of its depth's last digit (`o` without
    a depth), the fit's curve as dots. Empty when no trial has both numbers."""
    pts = _points(rows, key)
    if not pts:
        return ""
    lx = [math.log10(x) for x, _, _ in pts]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    curve = []
    if fit is not None:
        xs = np.linspace(x0, x1, width)
        curve = list(zip(xs, np.asarray(fit.predict(10 ** xs), dtype=float)))
    ys = [y for _, y, _ in pts] + [y for _, y in curve]
    y0, y1 = min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1

    def cell(x, y):
        return (round((y1 - y) / (y1 - y0) * (height - 1)), round((x - x0) / (x1 - x0) * (width - 1)))

    grid = [[" "] * width for _ in range(height)]
    for x, y in curve:
        r, c = cell(x, y)
        grid[r][c] = "."
    for x, y, row in pts:
        r, c = cell(math.log10(x), y)
        grid[r][c] = "o" if row["depth"] is None else str(int(row["depth"]) % 10)
    label = f"{y1:.4g}"
    pad = max(len(label), len(f"{y0:.4g}"))
    lines = [f"{(label if i == 0 else f'{y0:.4g}' if i == height - 1 else ''):>{pad}} |" + "".join(g)
             for i, g in enumerate(grid)]
    lines.append(" " * pad + " +" + "-" * width)
    lines.append(" " * pad + f"  {10 ** x0:.2e}" + f"{10 ** x1:.2e}".rjust(width - 10) + "  FLOPs")
    return f"{key} vs training FLOPs (log x); digits: depth mod 10" + (", dots: the fit" if curve else "") + \
        "\n" + "\n".join(lines)


def _depth_colors(rows: list[dict]) -> dict:
    depths = sorted({r["depth"] for r in rows if r["depth"] is not None})
    cmap = colormaps["viridis"]
    return {d: cmap(0.85 * i / max(len(depths) - 1, 1)) for i, d in enumerate(depths)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _points(rows: list[dict], key: str) -> list[tuple[float, float, dict]]:
    """(FLOPs, value, row) of each row with both present and FLOPs > 0 (the axis is log)."""
    pts = [(_num(r["flops"]), _num(r[key]), r) for r in rows]
    return [(x, y, r) for x, y, r in pts if x is not None and y is not None and x > 0 and math.isfinite(y)]


def _scatter(ax, pts, colors) -> None:
    for x, y, r in pts:
        color = colors.get(r["depth"], "gray")
        done = r["status"] == "done"
        ax.scatter([x], [y], s=40, zorder=3, color=color if done else "none", edgecolors=color)
        label = r["trial"] if r["depth"] is None else f"d{r['depth']}"
        ax.annotate(label + ("" if done else f" ({r['status']})"), (x, y), xytext=(5, 4),
                    textcoords="offset points", fontsize=8)


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def _bpb_plot(rows, colors, fit) -> bytes:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    pts = _points(rows, "val_bpb")
    if pts:
        ax.set_xscale("log")
        _scatter(ax, pts, colors)
        if fit is not None:
            lo, hi = min(x for x, _, _ in pts), max(x for x, _, _ in pts)
            xs = np.geomspace(lo / 2, hi * 2, 200)
            ax.plot(xs, np.asarray(fit.predict(xs), dtype=float), color="black", lw=1, ls="--", label=f"fit: {fit}")
            ax.legend(fontsize=8)
    else:
        _empty(ax, "val bpb")
    ax.set(xlabel="training FLOPs", ylabel="val bpb", title="val bpb vs training FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _core_plot(rows, colors) -> bytes:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    pts = _points(rows, "core")
    if pts:
        ax.set_xscale("log")
        _scatter(ax, pts, colors)
    else:
        _empty(ax, "CORE with FLOPs")
    ax.set(xlabel="training FLOPs", ylabel="CORE", title="CORE vs training FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _prediction_plot(rows, colors, prediction) -> bytes:
    """val bpb and CORE vs FLOPs: the trials, the law that answers each metric's targets with its 95% band,
    carried out to the targets' FLOPs, and each target (a star at its FLOPs, the bar its interval)."""
    fig = Figure(figsize=(11, 4.4))
    for ax, key, label in zip(fig.subplots(1, 2), ("val_bpb", "core"), ("val bpb", "CORE")):
        pts = _points(rows, key)
        needs = [n for n in prediction.needs if n.target.metric == key]
        xs = [x for x, _, _ in pts] + [n.flops_needed for n in needs if n.flops_needed]
        if not pts:
            _empty(ax, label)
        else:
            lo = min(x for x, _, _ in pts) / 2
            hi = min(max(xs), 1e6 * max(x for x, _, _ in pts)) * 2  # at most 6 decades past the family
            grid = np.geomspace(lo, hi, 200)
            curve = prediction.curve(key, grid)
            if curve is not None:
                mid, band_lo, band_hi = (np.asarray(c, dtype=float) for c in curve)
                ax.fill_between(grid, band_lo, band_hi, color="gray", alpha=0.25, lw=0, label="95% band")
                ax.plot(grid, mid, color="black", lw=1, ls="--", label=prediction.law_name(key))
            for n in needs:
                ax.axhline(n.target.value, color="tab:red", lw=0.8, ls=":")
                if n.flops_needed and n.flops_needed <= hi:
                    c_lo, c_hi = (min(v, hi) if v is not None else hi for v in n.flops_needed_ci)  # open: to the edge
                    ax.errorbar([n.flops_needed], [n.target.value], fmt="*", ms=10, color="tab:red",
                                xerr=[[max(n.flops_needed - c_lo, 0)], [max(c_hi - n.flops_needed, 0)]], capsize=3)
                where = f"d{n.depth}" if n.depth else "out of reach"
                ax.annotate(f"{label} {n.target.value:g}: {where}", (grid[0], n.target.value), xytext=(2, 3),
                            textcoords="offset points", fontsize=8, color="tab:red")
            ax.set_xscale("log")
            _scatter(ax, pts, colors)
            ax.legend(fontsize=8, loc="upper right")
        ax.set(xlabel="training FLOPs", ylabel=label, title=f"{label}: fit, 95% band, targets")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _surface_plot(rows, colors, prediction) -> bytes:
    """The loss surface's isoFLOP curves (val bpb vs params along C = k·N·D) at the trials' budgets (or
    FLOPs) and the targets', the trials, and the compute-optimal N*(C); without a surface, the trials in
    (params, tokens) and why there is none."""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    surface = prediction.fits.surface
    done = [r for r in rows if r["status"] == "done" and (_num(r["params"]) or 0) > 0]
    if surface is None:
        for r in done:
            if (_num(r["tokens"]) or 0) > 0:
                ax.scatter([r["params"]], [r["tokens"]], s=40, color=colors.get(r["depth"], "gray"))
                ax.annotate(f"d{r['depth']}", (r["params"], r["tokens"]), xytext=(5, 4), textcoords="offset points",
                            fontsize=8)
        if ax.has_data():
            ax.set_xscale("log")
            ax.set_yscale("log")
        why = prediction.fits.missing.get("surface", "not fitted")
        ax.text(0.03, 0.97, "loss surface not fitted:\n" + _wrap(why, 52), ha="left", va="top", fontsize=9,
                transform=ax.transAxes, color="dimgray", bbox=dict(facecolor="white", edgecolor="lightgray"))
        ax.set(xlabel="scaling params N", ylabel="tokens D", title="trials in (N, D): no loss surface")
    else:
        budgets = sorted({_num(r["flops_budget"]) for r in done if _num(r["flops_budget"])})
        if not budgets:
            flops = [_num(r["flops"]) for r in done if _num(r["flops"])]
            budgets = list(np.geomspace(min(flops), max(flops), 4)) if flops else []
        targets = sorted(n.flops_needed for n in prediction.needs if n.law == "loss surface" and n.flops_needed)
        cmap = colormaps["plasma"]
        every = budgets + [c for c in targets if c > max(budgets, default=0)][:2]
        for i, c in enumerate(every):
            n_opt = float(surface.optimal(c)[0])
            n = n_opt * np.geomspace(0.1, 10, 100)
            ax.plot(n, surface.predict(n, c / (surface.flops_per_param_token * n)), lw=1.2,
                    color=cmap(0.85 * i / max(len(every) - 1, 1)), ls="-" if c in budgets else "--",
                    label=f"C = {c:.2g}" + ("" if c in budgets else " (target)"))
        if every:
            cs = np.geomspace(min(every), max(every), 50)
            ax.plot(surface.optimal(cs)[0], surface.frontier(cs), color="black", lw=1, ls=":", label="N*(C)")
        for r in done:
            if _num(r["val_bpb"]) is not None:
                ax.scatter([r["params"]], [r["val_bpb"]], s=30, zorder=3, color=colors.get(r["depth"], "gray"),
                           edgecolors="black", linewidths=0.5)
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.set(xlabel="scaling params N", ylabel="val bpb", title="loss surface: isoFLOP curves (Approach 3)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def _series(history: list[dict], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    pts = [(_num(m.get(xkey)), _num(m.get(ykey))) for m in history]
    pts = [(x, y) for x, y in pts if x is not None and y is not None and x > 0 and math.isfinite(y)]
    return [x for x, _ in pts], [y for _, y in pts]


def _loss_plot(rows, histories, colors) -> bytes:
    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_bpb = fig.subplots(1, 2, sharex=True)
    traced = [(r, histories.get(r["trial"]) or []) for r in rows]
    xkey = "flops" if any(_series(h, "flops", "train_loss")[0] for _, h in traced) else "tokens"
    for r, history in traced:
        color = colors.get(r["depth"], "gray")
        xs, ys = _series(history, xkey, "train_loss")
        if xs:
            ax_loss.plot(xs, ys, color=color, lw=1.2, label=r["trial"])
        xs, ys = _series(history, xkey, "val_bpb")
        if xs:
            ax_bpb.plot(xs, ys, color=color, lw=0.8, marker="o", ms=3, label=r["trial"])
    for ax, ylabel in ((ax_loss, "train loss"), (ax_bpb, "val bpb")):
        if ax.has_data():
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        else:
            _empty(ax, ylabel)
        ax.set(xlabel=f"training {'FLOPs' if xkey == 'flops' else 'tokens'}", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------------
# Pages


def _prediction_tables(prediction) -> dict[str, tuple[str, list[str], list[list[str]], list[str]]]:
    """{heading: (text above, header, cells, bullet lines below)} of a prediction."""
    header, cells = prediction.table()
    notes = [f"{n.target.metric} {n.target.value:g}: {n.note}" for n in prediction.needs if n.note]
    tables = {"What it takes": (prediction.assumptions() + ". FLOPs needed: where the law reaches the target; "
                                "depth: the smallest dial depth that does, trained on the tokens shown.",
                                header, cells, notes + prediction.fits.lines())}
    if prediction.comparison:
        tables["Compute-optimal allocation: Approach 2 vs Approach 3"] = (
            "Tokens per param with 95% intervals; 'disagree': the two intervals do not overlap.",
            list(prediction.comparison_header), prediction.comparison, [])
    return tables


def _md_row(values) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


def _markdown(title, summary, header, cells, fit_line, plots, text, sections, tables) -> str:
    parts = [f"# {title}", "", summary, "", _md_row(header), _md_row(["---"] * len(header))]
    parts += [_md_row(c) for c in cells]
    if fit_line:
        parts += ["", fit_line]
    for heading, (above, t_header, t_cells, below) in tables.items():
        parts += ["", f"## {heading}", "", above, "", _md_row(t_header), _md_row(["---"] * len(t_header))]
        parts += [_md_row(c) for c in t_cells]
        if below:
            parts += ["", *(f"- {line}" for line in below)]
    for name, (caption, _) in plots.items():
        parts += ["", f"![{caption}]({name})"]
    if text:
        parts += ["", "```", text, "```"]
    for heading, lines in sections.items():
        parts += ["", f"## {heading}", "", *(f"- {line}" for line in lines)]
    return "\n".join(parts) + "\n"


CSS = """body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f0f0f0; }
td:first-child, td:last-child, th:first-child, th:last-child { text-align: left; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9rem; }"""


def _html(title, summary, header, cells, fit_line, plots, sections, tables) -> str:
    esc = html.escape
    parts = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>\n{CSS}\n</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>", f"<p>{esc(summary)}</p>",
             "<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in c) + "</tr>" for c in cells]
    parts.append("</table>")
    if fit_line:
        parts.append(f"<p>{esc(fit_line)}</p>")
    for heading, (above, t_header, t_cells, below) in tables.items():
        parts += [f"<h2>{esc(heading)}</h2>", f"<p>{esc(above)}</p>", "<table>",
                  "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in t_header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in c) + "</tr>" for c in t_cells]
        parts.append("</table>")
        if below:
            parts += ["<ul>", *(f"<li>{esc(line)}</li>" for line in below), "</ul>"]
    for name, (caption, png) in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                     f"<figcaption>{esc(caption)} ({esc(name)})</figcaption></figure>")
    for heading, lines in sections.items():
        parts += [f"<h2>{esc(heading)}</h2>", "<ul>", *(f"<li>{esc(line)}</li>" for line in lines), "</ul>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
