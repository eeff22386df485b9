"""The demo's report.html: training curves, a confusion matrix on the held-out digits, the
least confident images, the error table and generated text at three temperatures. Images are
PNG files in report_files/ beside it."""

from __future__ import annotations

import html
import io
import shutil
import tarfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kiln.models import SamplingSettings, row_seed, sample  # noqa: E402
from kiln.pipelines.sink import OutputDir  # noqa: E402
from kiln.pipelines.storage import load_model  # noqa: E402

TEMPERATURES = (0.5, 0.8, 1.1)
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{margin-bottom:0}.sub{color:#666}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}pre{white-space:pre-wrap;
margin:0;font-size:13px}.figs{display:flex;gap:1em;flex-wrap:wrap}.figs>div{flex:1}"""


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"report_files/{path.name}"


def confusion_png(rows: list[dict], truth: dict, classes: list[str], path: Path) -> tuple:
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for r in rows:
        if r["error"] is None and r["path"] in truth:
            m[index[truth[r["path"]]], index[r["label"]]] += 1
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > m.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
           yticklabels=classes, xlabel="predicted", ylabel="true", title="held-out digits")
    return _save(fig, path), float(np.trace(m) / max(m.sum(), 1))


def contact_sheet_png(rows: list[dict], tar_path: Path, path: Path, n: int = 24) -> str:
    worst = sorted((r for r in rows if r["error"] is None), key=lambda r: r["confidence"])[:n]
    with tarfile.open(tar_path) as tar:
        images = [Image.open(io.BytesIO(tar.extractfile(r["path"]).read())) for r in worst]
    cols = 8
    fig, axes = plt.subplots(max(1, -(-len(worst) // cols)), cols, figsize=(11, 1.6 * 3))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, r, img in zip(np.ravel(axes), worst, images, strict=False):
        ax.imshow(np.asarray(img.convert("L")), cmap="gray")
        ax.set_title(f"{r['label']} ({r['confidence']:.2f})", fontsize=9)
    return _save(fig, path)


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def temperature_samples(run: Path) -> list[list]:
    loaded = load_model(str(run), expect_kind="rnn")
    prompts = ["def ", "class ", "import "]
    out = []
    for t in TEMPERATURES:
        texts = sample(loaded.model, loaded.vocab, prompts, [row_seed(0, p) for p in prompts],
                       SamplingSettings(max_chars=160, temperature=t))
        out += [[f"{t}", f"<pre>{html.escape(p)}</pre>", f"<pre>{html.escape(x)}</pre>"]
                for p, x in zip(prompts, texts, strict=True)]
    return out


def write_report(root: Path, data: dict, label_summary: dict, gen_summary: dict) -> dict:
    files = root / "report_files"
    files.mkdir(exist_ok=True)
    runs = root / "runs"
    for run in ("digits", "chars"):
        shutil.copy(runs / run / "curves.png", files / f"{run}-curves.png")
    labels = OutputDir(str(root / "labels")).read_table().to_pylist()
    cnn = load_model(str(runs / "digits"), expect_kind="cnn")
    conf_src, acc = confusion_png(labels, data["truth"], cnn.spec.classes, files / "confusion.png")
    sheet = contact_sheet_png(labels, data["label_tar"], files / "least-confident.png")
    errors = [[html.escape(r["path"]), html.escape(r["error"])] for r in labels if r["error"]]
    gen = OutputDir(str(root / "generated")).read_table().to_pylist()
    gen_rows = [[f"<pre>{html.escape(r['prompt'])}</pre>", f"<pre>{html.escape(r['text'])}</pre>"]
                for r in sorted(gen, key=lambda r: str(r["id"]))[:8]]
    rnn_metrics = load_model(str(runs / "chars")).config["metrics"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kiln demo</title>
<style>{CSS}</style></head><body>
<h1>kiln demo</h1><p class="sub">Trained with Ray Train, applied with Ray Data, on scikit-learn's
digits and the Python standard library's source.</p>
<h2 id="training">Training curves</h2><div class="figs">
<div><h3>digit CNN</h3><img src="report_files/digits-curves.png" alt="CNN curves"></div>
<div><h3>char-RNN</h3><img src="report_files/chars-curves.png" alt="RNN curves"></div></div>
<h2 id="confusion">Confusion matrix on held-out digits</h2>
<p>Accuracy {acc:.2%} on {sum(1 for r in labels if r['path'] in data['truth']):,} images the
model never saw.</p><img src="{conf_src}" alt="confusion matrix">
<h2 id="least-confident">Least confident images</h2><img src="{sheet}" alt="contact sheet">
<h2 id="errors">Errors</h2><p>Bad inputs become rows with <code>error</code> set; the rest is
labeled.</p>{table(["path", "error"], errors)}
<h2 id="generated">Generated text</h2><p>Validation {rnn_metrics['bits_per_char']:.2f}
bits/char. At three temperatures:</p>{table(["temperature", "prompt", "continuation"],
                                            temperature_samples(runs / "chars"))}
<p>From <code>kiln generate</code> (temperature 0.8):</p>{table(["prompt", "text"], gen_rows)}
</body></html>"""
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return {"path": path, "accuracy": acc, "labeled": sum(1 for r in labels if not r["error"]),
            "errors": len(errors), "generated": len(gen),
            "bits_per_char": rnn_metrics["bits_per_char"]}
