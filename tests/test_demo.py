"""`kiln demo` end to end at a reduced size: every artefact exists and is well-formed, and the
report renders its images in headless Chromium."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

LABEL_COLUMNS = ["source", "path", "label", "confidence", "top_labels", "top_scores", "error",
                 "model"]
GEN_COLUMNS = ["id", "prompt", "text", "seed", "temperature", "model"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    res = subprocess.run([sys.executable, "-m", "kiln", "demo", "--small", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res.stderr


def parts(folder: Path):
    files = sorted(folder.glob("part-*.parquet"))
    assert files, f"no Parquet parts in {folder}"
    return files


def test_demo_writes_every_artefact(demo):
    out, log = demo
    for run in ("digits", "chars"):
        cfg = json.loads((out / "runs" / run / "model" / "config.json").read_text())
        assert cfg["kind"] == ("cnn" if run == "digits" else "rnn")
        assert (out / "runs" / run / "model" / "weights.safetensors").stat().st_size > 1000
        lines = (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
        assert lines and all("val_loss" in json.loads(x) for x in lines)
        Image.open(out / "runs" / run / "curves.png").verify()
    labels = [pq.read_table(p) for p in parts(out / "labels")]
    assert all(t.column_names == LABEL_COLUMNS for t in labels)
    rows = [r for t in labels for r in t.to_pylist()]
    assert len({(r["source"], r["path"]) for r in rows}) == len(rows)
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 4 and all(r["label"] is None for r in errors)
    summary = json.loads((out / "labels" / "summary.json").read_text())
    assert summary["rows_written"] == len(rows)
    gen = [r for p in parts(out / "generated") for r in pq.read_table(p).to_pylist()]
    assert set(gen[0]) >= set(GEN_COLUMNS) and len(gen) == 24
    assert "report.html" in log


def test_report_sections_and_images(demo):
    out, _ = demo
    page = (out / "report.html").read_text()
    for section in ("training", "confusion", "least-confident", "errors", "generated"):
        assert f'id="{section}"' in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 4
    for src in images:
        Image.open(out / src).verify()
    assert page.count("<tr>") > 10


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, shot: Path, profile: Path) -> Image.Image:
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
                    "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    return Image.open(shot).convert("L").resize((300, 600))


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium); .ci/run installs it where it can")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    """The same page with its images' files missing is the control: the real one must show
    far more ink (curves, matrix, the black-backed digit sheet)."""
    out, _ = demo
    real = screenshot(out / "report.html", tmp_path / "real.png", tmp_path / "p1")
    broken = out / "report-broken.html"
    broken.write_text((out / "report.html").read_text().replace('src="report_files/',
                                                                'src="missing/'))
    control = screenshot(broken, tmp_path / "control.png", tmp_path / "p2")
    ink = lambda img: int((np.asarray(img) < 128).sum())  # noqa: E731
    assert ink(real) > 2 * ink(control) + 2000, (ink(real), ink(control))
