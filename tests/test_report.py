"""The miniseries report from synthetic rows and histories: CSV, PNGs, markdown, self-contained HTML."""

import base64
import csv
import math
import re

import numpy as np
import pytest
from matplotlib.image import imread

from nanoray import storage
from nanoray.report import COLUMNS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def make_row(depth: int, **overrides) -> dict:
    params = 1e5 * depth**3
    tokens = 12 * params
    row = dict(
        trial=f"d{depth}", depth=depth, preset="tiny", horizon="ratio", ratio=12.0, flops_budget=None,
        params=int(params), total_params=int(2 * params), tokens=int(tokens), flops=6 * params * tokens,
        iterations=100, steps_done=100, wall_s=100.0 * depth, train_s=90.0 * depth, gpu_hours=0.03 * depth,
        cost_usd=0.09 * depth, train_loss=4.0 - 0.3 * depth, val_loss=4.1 - 0.3 * depth,
        val_bpb=1.6 - 0.1 * depth, core=None, tok_per_s=1.5e5 / depth, mfu=0.4, checkpoint=f"/ckpt/d{depth}",
        status="done")
    return row | overrides


def make_history(row: dict, n: int = 5) -> list[dict]:
    out = []
    for i in range(1, n + 1):
        frac = i / n
        out.append(dict(step=i * 20, tokens=row["tokens"] * frac, flops=row["flops"] * frac,
                        train_loss=row["train_loss"] + 2 * (1 - frac), val_loss=NAN if i < n else row["val_loss"],
                        val_bpb=np.float64(NAN) if i < 3 else row["val_bpb"] + 0.5 * (1 - frac),
                        tok_per_s=row["tok_per_s"], mfu=row["mfu"]))
    return out


class PowerLaw:
    """Duck-typed stand-in for nanoray.scaling's fit."""

    def predict(self, x):
        return 0.7 + 50 * np.asarray(x, dtype=float) ** -0.1

    def __str__(self):
        return "bpb = 0.70 + 50·C^-0.100"


@pytest.fixture
def series():
    rows = [make_row(d) for d in (2, 3, 4)]
    rows.append(make_row(5, steps_done=7, train_loss=NAN, val_loss=NAN, val_bpb=NAN, tok_per_s=None, mfu=None,
                         train_s=None, checkpoint=None, status="error"))
    histories = {r["trial"]: make_history(r) for r in rows[:3]}
    histories["d5"] = []
    return rows, histories


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_results_csv_round_trips(tmp_path, series):
    rows, histories = series
    paths = write_report(rows, histories, tmp_path)
    assert paths["results.csv"] == tmp_path / "results.csv"
    header, parsed = read_csv(tmp_path / "results.csv")
    assert header == COLUMNS + ["busy_fraction"]
    assert [p["trial"] for p in parsed] == ["d2", "d3", "d4", "d5"]
    for row, p in zip(rows, parsed):
        assert int(p["depth"]) == row["depth"] and int(p["tokens"]) == row["tokens"]
        assert float(p["flops"]) == row["flops"]  # full precision, not the table's rounding
        assert p["status"] == row["status"] and p["preset"] == "tiny" and p["flops_budget"] == ""
    assert float(parsed[0]["busy_fraction"]) == pytest.approx(0.9)
    assert float(parsed[0]["val_bpb"]) == pytest.approx(1.4)
    error = parsed[3]
    assert math.isnan(float(error["val_bpb"]))  # NaN stays NaN (a diverged loss), None is empty
    assert error["tok_per_s"] == error["train_s"] == error["busy_fraction"] == error["checkpoint"] == ""


def test_plots_are_valid_pngs(tmp_path, series):
    rows, histories = series
    paths = write_report(rows, histories, tmp_path, fit=PowerLaw())
    for name in ("bpb_vs_flops.png", "loss_curves.png"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        height, width, _ = imread(paths[name]).shape
        assert 300 < height < 1000 and 500 < width < 1500  # small files at dpi ~110
    assert "core_vs_flops.png" not in paths and not (tmp_path / "core_vs_flops.png").exists()


def test_markdown_has_table_fit_and_plots(tmp_path, series):
    rows, histories = series
    write_report(rows, histories, tmp_path, title="tiny family", fit=PowerLaw())
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# tiny family\n")
    for name in ("bpb_vs_flops.png", "loss_curves.png"):
        assert f"]({name})" in md
    assert "core_vs_flops.png" not in md
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| d")}
    assert set(lines) == {"d2", "d3", "d4", "d5"}
    assert "| 2 |" in lines["d2"] and "1.4000" in lines["d2"] and "40.0%" in lines["d2"] and "90.0" in lines["d2"]
    cells = [c.strip() for c in lines["d5"].split("|")[1:-1]]
    assert cells[-1] == "error" and cells.count("–") >= 4  # val bpb, CORE, tok/s, MFU, busy %
    assert "Fit: bpb = 0.70 + 50·C^-0.100" in md
    assert "nan" not in md.lower() and "None" not in md


def test_html_is_self_contained(tmp_path, series):
    rows, histories = series
    write_report(rows, histories, tmp_path, title="a <family>", fit=PowerLaw())
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]).startswith(PNG_MAGIC)
    assert "<title>a &lt;family&gt;</title>" in page
    assert "bpb = 0.70 + 50·C^-0.100" in page
    assert "<script" not in page and "http" not in page and 'src="bpb' not in page
    for trial in ("d2", "d3", "d4", "d5"):
        assert f"<td>{trial}</td>" in page


def test_core_plot_only_with_core(tmp_path, series):
    rows, histories = series
    scored = [r | dict(core=0.05 * r["depth"]) if r["status"] == "done" else r for r in rows]
    paths = write_report(scored, histories, tmp_path)
    assert paths["core_vs_flops.png"].read_bytes().startswith(PNG_MAGIC)
    assert "](core_vs_flops.png)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3
    write_report(rows, histories, tmp_path)  # CORE gone: the stale plot goes with it
    assert not (tmp_path / "core_vs_flops.png").exists()


def test_one_trial_without_history(tmp_path):
    paths = write_report([make_row(4, val_bpb=None)], {}, tmp_path, fit=PowerLaw())
    assert set(paths) == {"results.csv", "bpb_vs_flops.png", "loss_curves.png", "report.md", "report.html"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert len(read_csv(paths["results.csv"])[1]) == 1


def test_bad_rows_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        write_report([make_row(2), make_row(2)], {}, tmp_path)
    row = make_row(2)
    del row["core"]
    with pytest.raises(ValueError, match="core"):
        write_report([row], {}, tmp_path)
    with pytest.raises(ValueError, match="no trials"):
        write_report([], {}, tmp_path)


def test_a_failed_write_keeps_the_old_files(tmp_path, series, monkeypatch):
    rows, histories = series
    write_report(rows, histories, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    class Broken(PowerLaw):
        def predict(self, x):
            raise RuntimeError("fit broke")

    with pytest.raises(RuntimeError, match="fit broke"):  # fails after results.csv, before the pages
        write_report([r | dict(status="stopped") for r in rows], histories, tmp_path, fit=Broken())
    assert (tmp_path / "report.md").read_bytes() == before["report.md"]

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", no_rename)  # every write of the report goes through storage
    with pytest.raises(OSError, match="disk full"):
        write_report(rows[:1], {}, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(before)  # no temp files left behind
    assert (tmp_path / "results.csv").read_bytes() != b""


def test_text_plot_places_each_trial(series):
    from nanoray.report import text_plot

    rows, _ = series
    text = text_plot(rows, "val_bpb", width=40, height=10)
    grid = [line.split("|", 1)[1] for line in text.splitlines()[1:11]]
    where = {ch: (r, c) for r, line in enumerate(grid) for c, ch in enumerate(line) if ch.isdigit()}
    assert set(where) == {"2", "3", "4"}  # d5 has no val bpb
    # more FLOPs: further right; lower bpb: further down (top row: the highest value, bottom: the lowest)
    assert where["2"][1] < where["3"][1] < where["4"][1] and where["2"][0] == 0 < where["3"][0] < where["4"][0] == 9
    assert "." not in "".join(grid) and text.splitlines()[-1].rstrip().endswith("FLOPs")
    assert "." in text_plot(rows, "val_bpb", PowerLaw())
    assert text_plot(rows, "core") == ""  # no trial has a CORE score
