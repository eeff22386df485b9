"""The figures of `kiln eval` on images, from its rows (one per image: the true class, the
top-1 class, its probability, the top-5 classes), and OUTPUT/eval.html: one self-contained
page with the figures, the confusion matrix and a contact sheet of the most confident
mistakes."""

from __future__ import annotations

import html
from collections import Counter

import numpy as np

ECE_BINS = 15  # equal-width confidence bins (Guo et al., 2017)
SHEET = 32  # the most confident mistakes shown
TOP = 5


def image_metrics(truth: list[str], pred: list[str], conf: list[float],
                  top5: list[bool], classes: list[str]) -> dict:
    """Accuracy, top-5 accuracy, per-class precision / recall / F1 / support, the confusion
    matrix and the expected calibration error. Classes of the labeled set that the model
    never saw are rows of their own (never predicted, so never right); macro averages run
    over the classes the labeled set holds."""
    n = len(truth)
    t, p = np.asarray(truth, object), np.asarray(pred, object)
    hit = t == p
    unseen = sorted(set(truth) - set(classes))
    labels = list(classes) + unseen
    index = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(cm, ([index[x] for x in truth], [index[x] for x in pred]), 1)
    per_class = []
    for i, c in enumerate(labels):
        tp, predicted, support = int(cm[i, i]), int(cm[:, i].sum()), int(cm[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": c, "precision": precision, "recall": recall, "f1": f1,
                          "support": support, "predicted": predicted,
                          "seen_in_training": c in classes})
    present = [r for r in per_class if r["support"]]
    macro = {k: float(np.mean([r[k] for r in present])) if present else 0.0
             for k in ("precision", "recall", "f1")}
    c = np.asarray(conf, np.float64)
    bins = np.minimum((c * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    reliability, ece = [], 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            acc, mean_conf = float(hit[m].mean()), float(c[m].mean())
            ece += m.sum() / n * abs(acc - mean_conf)
            reliability.append({"bin": [b / ECE_BINS, (b + 1) / ECE_BINS], "images": int(m.sum()),
                                "accuracy": acc, "confidence": mean_conf})
    return {
        "images": n,
        "accuracy": float(hit.mean()) if n else 0.0,
        f"top{TOP}_accuracy": float(np.mean(top5)) if n else 0.0,
        "macro": macro,
        "ece": float(ece),
        "mean_confidence": float(c.mean()) if n else 0.0,
        "unseen_classes": dict(Counter(x for x in truth if x in set(unseen))),
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": cm.tolist()},
        "reliability": reliability,
    }


def render(summary: dict, figures: dict, sheet: list[dict]) -> str:
    from kiln.reports.label import STYLE

    e = html.escape
    head = [("model", summary["model"]), ("data", summary["arguments"]["data"]),
            ("images scored", f"{figures['images']:,}"),
            ("error rows", f"{summary['error_rows']:,}"),
            ("accuracy", f"{figures['accuracy']:.4f}"),
            (f"top-{TOP} accuracy", f"{figures[f'top{TOP}_accuracy']:.4f}"),
            ("macro F1", f"{figures['macro']['f1']:.4f}"),
            ("expected calibration error", f"{figures['ece']:.4f} ({ECE_BINS} bins)")]
    if figures["unseen_classes"]:
        head.append(("classes the model never saw", ", ".join(
            f"{k} ({v})" for k, v in figures["unseen_classes"].items())))
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>kiln eval</title>"
           f"<style>{STYLE}.cm td{{text-align:right;min-width:2.2em}}</style></head><body>"
           "<h1>kiln eval</h1><table>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in head]
    out.append("</table><h2>Per class</h2><table><tr><th>class</th><th>precision</th>"
               "<th>recall</th><th>F1</th><th>support</th></tr>")
    for r in figures["per_class"]:
        note = "" if r["seen_in_training"] else " (not a class of the model)"
        out.append(f"<tr><td>{e(r['class'])}{note}</td><td>{r['precision']:.3f}</td>"
                   f"<td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td><td>{r['support']:,}"
                   "</td></tr>")
    out.append("</table><h2>Confusion matrix</h2><p>Rows: the true class; columns: the "
               "predicted one.</p><table class='cm'><tr><th></th>")
    labels, cm = figures["confusion"]["labels"], np.asarray(figures["confusion"]["matrix"])
    out += [f"<th>{e(c)}</th>" for c in labels]
    out.append("</tr>")
    for i, c in enumerate(labels):
        total = max(1, int(cm[i].sum()))
        cells = []
        for j, v in enumerate(cm[i]):
            shade = int(255 - 180 * v / total)
            colour = f"rgb({shade},{shade},255)" if i == j else f"rgb(255,{shade},{shade})"
            cells.append(f"<td style='background:{colour}'>{v}</td>" if v else "<td></td>")
        out.append(f"<tr><th>{e(c)}</th>{''.join(cells)}</tr>")
    out.append(f"</table><h2>The {len(sheet)} most confident mistakes</h2><div class='sheet'>")
    for r in sheet:
        img = f"<img src='{r['image']}' alt=''>" if r.get("image") else "<div>(unavailable)</div>"
        out.append(f"<div class='cell'>{img}<br>predicted <b>{e(str(r['label']))}</b> "
                   f"{r['confidence']:.3f}<br>true <b>{e(str(r['truth']))}</b><br>"
                   f"{e(r['path'])}</div>")
    out.append("</div></body></html>")
    return "\n".join(out)
