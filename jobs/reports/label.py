"""report.html for `kiln label --report`: one self-contained page (charts and thumbnails are
data: URIs, so it works from S3 or a mail attachment) with the label histogram, the confidence
histogram, a contact sheet of the least confident images and the table of errors."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.pipelines import storage
from kiln.pipelines.sink import OutputDir
from kiln.pipelines.thumbnails import fetch_thumbnails

REPORT_FILE = "report.html"
SHEET = 48  # images on the contact sheet
MAX_ERROR_ROWS = 1000  # the error table shows this many; the counts cover all
COLUMNS = ["source", "path", "label", "confidence", "error"]

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}.sheet{display:flex;flex-wrap:wrap;gap:10px}.cell{width:120px;font-size:11px;
word-break:break-all}.cell img{width:96px;height:96px;object-fit:contain;background:#eee;
image-rendering:pixelated}.charts img{max-width:48%}"""


def read_output(out: OutputDir) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=COLUMNS)
              for p in out.parts()]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
    return pa.concat_tables(tables)


def write_report(out: OutputDir, summary: dict, parts: dict[str, dict], console=None) -> str:
    """Writes OUTPUT/report.html and returns its URI."""
    table = read_output(out)
    sheet = contact_sheet(table, parts)
    page = render(summary, table, sheet)
    uri = storage.join(out.uri, REPORT_FILE)
    storage.write_bytes(uri, page.encode())
    if console is not None:
        console.print(f"report: {uri}", highlight=False)
    return uri


def contact_sheet(table: pa.Table, parts: dict[str, dict]) -> list[dict]:
    """The SHEET least confident labeled rows, with thumbnails. This run's actors sent theirs
    along; rows that an earlier, interrupted run labeled are read again from their source."""
    labeled = table.filter(pc.is_null(table["error"]))
    if labeled.num_rows == 0:
        return []
    order = pc.sort_indices(labeled, [("confidence", "ascending")])[:SHEET]
    rows = labeled.take(order).to_pylist()
    have = {(t["source"], t["path"]): t["image"]
            for p in parts.values() for t in p.get("thumbs", [])}
    missing = [(r["source"], r["path"]) for r in rows if (r["source"], r["path"]) not in have]
    if missing:
        have.update(fetch_thumbnails(missing))
    for r in rows:
        r["image"] = have.get((r["source"], r["path"]))
    return rows


def chart(values, kind: str) -> str:
    """A bar chart of label counts or a histogram of confidences, as a PNG data: URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Class names are the user's text: "$" in one is a dollar, not matplotlib's math mode.
    with plt.rc_context({"text.parse_math": False}):
        return _chart(plt, values, kind)


def _chart(plt, values, kind: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if kind == "labels":
        names, counts = zip(*values, strict=True) if values else ((), ())
        ax.bar(range(len(names)), counts, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0,
                      fontsize=8)
        ax.set_title("Labels (top-1)")
        ax.set_ylabel("images")
    else:
        ax.hist(values, bins=20, range=(0.0, 1.0), color="#55a868")
        ax.set_title("Confidence (top-1 probability)")
        ax.set_xlabel("confidence")
        ax.set_ylabel("images")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render(summary: dict, table: pa.Table, sheet: list[dict]) -> str:
    e = html.escape
    labels = list(summary.get("labels", {}).items())[:60]
    conf = table.filter(pc.is_valid(table["confidence"]))["confidence"].to_numpy()
    head = [
        ("model", summary["model"]), ("inputs", ", ".join(summary["arguments"]["inputs"])),
        ("rows", f"{summary['rows_in']:,}"), ("labeled", f"{summary['rows_labeled']:,}"),
        ("errors", f"{summary['error_rows']:,}"),
        ("throughput", f"{summary['rows_per_s']:,.0f} rows/s over {summary['elapsed_s']} s"),
    ]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>kiln label report"
           f"</title><style>{STYLE}</style></head><body><h1>kiln label report</h1><table>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in head]
    out.append("</table><h2>Distributions</h2><div class='charts'>")
    out.append(f"<img alt='label histogram' src='{chart(labels, 'labels')}'>")
    out.append(f"<img alt='confidence histogram' src='{chart(np.asarray(conf), 'conf')}'>")
    out.append(f"</div><h2>Least confident {len(sheet)} images</h2><div class='sheet'>")
    for r in sheet:
        img = (f"<img src='{r['image']}' alt=''>" if r["image"] else "<div>(unavailable)</div>")
        out.append(f"<div class='cell'>{img}<br><b>{e(str(r['label']))}</b> "
                   f"{r['confidence']:.3f}<br>{e(r['path'])}</div>")
    out.append("</div>")
    out += error_table(summary, table)
    out.append("</body></html>")
    return "\n".join(out)


def error_table(summary: dict, table: pa.Table) -> list[str]:
    e = html.escape
    errors = table.filter(pc.is_valid(table["error"]))
    out = ["<h2>Errors</h2>"]
    if errors.num_rows == 0:
        return out + ["<p>None: every input was labeled.</p>"]
    out.append("<table><tr><th>kind</th><th>rows</th></tr>")
    out += [f"<tr><td>{e(k)}</td><td>{v:,}</td></tr>" for k, v in summary["errors"].items()]
    out.append("</table><p></p><table><tr><th>source</th><th>path</th><th>error</th></tr>")
    for r in errors.slice(0, MAX_ERROR_ROWS).to_pylist():
        out.append(f"<tr><td>{e(r['source'])}</td><td>{e(r['path'])}</td>"
                   f"<td>{e(r['error'])}</td></tr>")
    out.append("</table>")
    if errors.num_rows > MAX_ERROR_ROWS:
        out.append(f"<p>... and {errors.num_rows - MAX_ERROR_ROWS:,} more errors.</p>")
    return out
