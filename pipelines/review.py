"""A person's review of a label output (`kiln review`): which rows to show first, the decisions
saved as they are made, and the final labels.

The decisions live in the output folder, in `reviews/`: one Parquet file a save, written whole
or not at all (storage.write_bytes), never rewritten. The review's state is the last decision of
each row, in the order the files' names give (a time and a random tag), so a kill loses no saved
decision and two people on one output count each row once. A row is named by its `source` and
`path`, as the label output names it (pipelines.names)."""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .sink import SUMMARY_FILE, OutputDir, read_job
from .units import Unit, chunks

REVIEWS = "reviews"  # the folder of decisions inside the label output
ACTIONS = ("accept", "correct", "undo")
DECISION_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("path", pa.string()),
    ("action", pa.string()),  # accept: the model's label is right; correct; undo: not reviewed
    ("label", pa.string()),  # the label the person gave (accept: the model's); null for undo
    ("model_label", pa.string()),  # the model's top-1 label when the person decided
    ("reviewer", pa.string()),
    ("at", pa.timestamp("ms", tz="UTC")),
])
MAX_DECISION_FILE = 1 << 20


@dataclass
class Reviewed:
    """The last decision of a row."""

    label: str
    action: str
    reviewer: str
    at: float  # seconds since the epoch


def is_label_output(uri: str) -> bool:
    """Whether `uri` is the output folder of kiln label (or kiln eval)."""
    job = read_job(uri)
    return job is not None and job.get("job") in ("label", "eval")


def read_decisions(output: str) -> dict[tuple[str, str], Reviewed]:
    """The review of a label output: the last saved decision of each row, by (source, path);
    an undone row has none."""
    folder = storage.join(output, REVIEWS)
    files = sorted(n for n in storage.list_dir(folder)
                   if n.startswith("d-") and n.endswith(".parquet"))
    state: dict[tuple[str, str], Reviewed] = {}
    for name in files:
        try:
            data = storage.read_bytes(storage.join(folder, name), MAX_DECISION_FILE)
            table = pq.read_table(io.BytesIO(data))
        except (storage.StorageError, pa.ArrowInvalid, OSError):
            continue  # not one of ours after all: it decides nothing
        for d in table.to_pylist():
            key = (d.get("source"), d.get("path"))
            if d.get("action") == "undo":
                state.pop(key, None)
            elif d.get("action") in ("accept", "correct") and d.get("label") is not None:
                at = d["at"].timestamp() if d.get("at") is not None else 0.0
                state[key] = Reviewed(d["label"], d["action"], d.get("reviewer") or "", at)
    return state


def reviewed_units(output: str, chunk: int = 500) -> list[Unit]:
    """A label output's reviewed rows as training data: units of kind `reviewed`, up to
    `chunk` rows of one source each, which pipelines.sources reads again from that source
    with the person's labels."""
    by_source: dict[str, list] = {}
    for (source, path), d in sorted(read_decisions(output).items()):
        by_source.setdefault(source, []).append([path, d.label])
    units = [u for source, rows in by_source.items()
             for u in chunks(source, "reviewed", rows, chunk)]
    for i, u in enumerate(units):
        u.index = i
    return units


class Review:
    """A label output's rows in the order a person should see them, and its decisions.

    `rows` is the output's labeled rows (error rows are counted, never shown), sorted so that
    the rows the model is least sure of come first: the smallest margin between its top two
    scores, then the lowest confidence. Where the output has a `truth` column (kiln eval's),
    the rows whose given label the model contradicts come first, the most confident first."""

    def __init__(self, output: str, model: str | None = None):
        self.output = storage.absolute(output)
        if not is_label_output(self.output):
            raise ValueError(f"{self.output} is not a label output: kiln review takes the "
                             "--output folder of kiln label (or kiln eval)")
        table = OutputDir(self.output).read_table()
        if table.num_rows == 0:
            raise ValueError(f"{self.output} holds no labeled rows yet: run kiln label first")
        self.errors = table.filter(pc.is_valid(table["error"])).num_rows
        rows = table.filter(pc.is_null(table["error"])).to_pylist()
        self.has_truth = "truth" in table.column_names
        rows.sort(key=self._rank)
        self.rows = rows
        self.index = {(r["source"], r["path"]): i for i, r in enumerate(rows)}
        self.model_classes = model_classes(self.output, model)
        seen = {c for r in rows for c in (r["top_labels"] or [])} | {r["label"] for r in rows}
        if self.has_truth:
            seen |= {r["truth"] for r in rows if r["truth"]}
        # The model's classes in its order, then any other (a truth column's, a person's).
        self.classes = [*self.model_classes, *sorted(seen - set(self.model_classes))]
        self.decisions: dict[tuple[str, str], Reviewed] = {}
        self.read_decisions()

    def _rank(self, row: dict) -> tuple:
        scores = row["top_scores"] or [row["confidence"]]
        margin = scores[0] - (scores[1] if len(scores) > 1 else 0.0)
        if self.has_truth and row.get("truth") is not None:
            contradicted = row["truth"] != row["label"]
            return (not contradicted, -row["confidence"] if contradicted else margin,
                    row["source"], row["path"])
        return (True, margin, row["confidence"], row["source"], row["path"])

    @property
    def folder(self) -> str:
        return storage.join(self.output, REVIEWS)

    def read_decisions(self) -> None:
        """Every saved decision, again (another reviewer's too)."""
        self.decisions = read_decisions(self.output)

    def decide(self, i: int, action: str, label: str | None, reviewer: str) -> None:
        """Saves one decision on row `i` (an index into rows): accept the model's label,
        correct it to `label`, or undo the row's decision."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        if not 0 <= i < len(self.rows):
            raise ValueError(f"no row {i}: the output has {len(self.rows)} labeled rows")
        row = self.rows[i]
        if action == "accept":
            label = row["label"]
        elif action == "correct" and not (isinstance(label, str) and label.strip()):
            raise ValueError("a correction needs the label the row should have")
        elif action == "undo":
            label = None
        label = label.strip() if label else label
        now = time.time()
        table = pa.Table.from_pylist([{
            "source": row["source"], "path": row["path"], "action": action, "label": label,
            "model_label": row["label"], "reviewer": reviewer,
            "at": datetime.fromtimestamp(now, UTC)}],
            schema=DECISION_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"d-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        storage.write_bytes(storage.join(self.folder, name), buf.getvalue())
        key = (row["source"], row["path"])
        if action == "undo":
            self.decisions.pop(key, None)
        else:
            self.decisions[key] = Reviewed(label, action, reviewer, now)
            if label not in self.classes:  # a class the model does not know: the next
                self.classes.append(label)  # training's new class

    def progress(self) -> dict:
        """Reviewed, corrected and left rows, and the model's accuracy on the reviewed ones."""
        reviewed = [(k, d) for k, d in self.decisions.items() if k in self.index]
        right = sum(d.label == self.rows[self.index[k]]["label"] for k, d in reviewed)
        return {"rows": len(self.rows), "errors": self.errors, "reviewed": len(reviewed),
                "corrected": len(reviewed) - right, "left": len(self.rows) - len(reviewed),
                "model_accuracy": right / len(reviewed) if reviewed else None}

    def final_labels(self) -> pa.Table:
        """Every labeled row with its final label: the person's where reviewed, else the
        model's; `labeled_by` says which."""
        out = {"source": [], "path": [], "label": [], "labeled_by": [], "model_label": [],
               "confidence": []}
        for r in sorted(self.rows, key=lambda r: (r["source"], r["path"])):
            d = self.decisions.get((r["source"], r["path"]))
            out["source"].append(r["source"])
            out["path"].append(r["path"])
            out["label"].append(d.label if d else r["label"])
            out["labeled_by"].append("person" if d else "model")
            out["model_label"].append(r["label"])
            out["confidence"].append(r["confidence"])
        return pa.table(out)


def model_classes(output: str, model: str | None) -> list[str]:
    """The class names of `model` (a model that cannot be read is the caller's error), or of
    the model that labeled the output, which its summary.json names (an output still being
    written has none yet: [])."""
    if model is not None:
        return [str(c) for c in storage.read_model_config(model)["spec"]["classes"]]
    try:
        summary = json.loads(storage.read_bytes(storage.join(output, SUMMARY_FILE),
                                                MAX_DECISION_FILE))
        config = storage.read_model_config(summary["arguments"]["model"])
        return [str(c) for c in config["spec"]["classes"]]
    except (storage.StorageError, ValueError, KeyError, TypeError):
        return []


def export(review: Review, file: str) -> int:
    """Writes the final labels to `file` (.parquet, or .csv), whole or not at all; refuses a
    file that exists. Returns the rows written."""
    import pyarrow.csv as pacsv

    file = storage.absolute(file)
    if not file.endswith((".parquet", ".csv")):
        raise ValueError(f"--export {file}: name a .parquet or .csv file")
    if storage.exists(file):
        raise ValueError(f"--export {file} exists; kiln writes a new file: choose another name")
    if storage.is_dir(review.output) and (file + "/").startswith(review.output + "/"):
        raise ValueError(f"--export {file} lies inside the label output: choose a file outside")
    table = review.final_labels()
    buf = io.BytesIO()
    if file.endswith(".csv"):
        pacsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    storage.write_bytes(file, buf.getvalue())
    return table.num_rows
