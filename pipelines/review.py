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


class Decisions:
    """The saved decisions of a label output, read incrementally: a decision file is never
    rewritten, so each is read once, and `refresh()` gives the last decision of each row, by
    (source, path), in the files' order (their names: a time, then a random tag); an undone
    row has none. A file that cannot be read stops the caller (an error, never a decision
    silently lost); a file that is not a decision (it does not parse) decides nothing."""

    def __init__(self, output: str):
        self.folder = storage.join(output, REVIEWS)
        self.files: dict[str, list[dict]] = {}
        self.ignored: set[str] = set()

    def refresh(self) -> dict[tuple[str, str], Reviewed]:
        names = sorted(n for n in storage.list_dir(self.folder)
                       if n.startswith("d-") and n.endswith(".parquet"))
        for name in names:
            if name in self.files or name in self.ignored:
                continue
            try:
                data = storage.read_bytes(storage.join(self.folder, name), MAX_DECISION_FILE)
                self.files[name] = pq.read_table(io.BytesIO(data)).to_pylist()
            except (storage.TooLarge, pa.ArrowInvalid):
                self.ignored.add(name)  # not one of ours: it decides nothing
        state: dict[tuple[str, str], Reviewed] = {}
        for name in names:
            for d in self.files.get(name, ()):
                key = (d.get("source"), d.get("path"))
                if d.get("action") == "undo":
                    state.pop(key, None)
                elif d.get("action") in ("accept", "correct") and d.get("label") is not None:
                    at = d["at"].timestamp() if d.get("at") is not None else 0.0
                    state[key] = Reviewed(d["label"], d["action"], d.get("reviewer") or "", at)
        return state


def read_decisions(output: str) -> dict[tuple[str, str], Reviewed]:
    """The review of a label output: the last saved decision of each row (Decisions)."""
    return Decisions(output).refresh()


def reviewed_units(output: str, chunk: int = 500) -> list[Unit]:
    """A label output's reviewed rows as training data: units of kind `reviewed`, up to
    `chunk` rows of one source each, which pipelines.sources reads again from that source
    with the person's labels."""
    table = OutputDir(output).read_table()
    held = set() if table.num_rows == 0 else set(zip(
        table["source"].to_pylist(), table["path"].to_pylist(), strict=True))
    by_source: dict[str, list] = {}
    for (source, path), d in sorted(read_decisions(output).items()):
        if (source, path) in held:  # a decision on a row the output no longer holds: none
            by_source.setdefault(source, []).append([path, d.label])
    units = [u for source, items in by_source.items()
             for u in chunks(source, "reviewed", items, chunk)]
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
        self.output = storage.absolute(output).rstrip("/")
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
        self._saved = Decisions(self.output)
        self.decisions: dict[tuple[str, str], Reviewed] = {}
        self.read_decisions()

    def _rank(self, row: dict) -> tuple:
        """(group, primary, confidence, source, path): the contradicted rows of an output
        with a truth column (group 0), the most confident first; then every other row by its
        top-two margin and its confidence, smallest first."""
        scores = row["top_scores"] or [row["confidence"]]
        margin = scores[0] - (scores[1] if len(scores) > 1 else 0.0)
        if self.has_truth and row.get("truth") is not None and row["truth"] != row["label"]:
            return (0, -row["confidence"], row["confidence"], row["source"], row["path"])
        return (1, margin, row["confidence"], row["source"], row["path"])

    def read_decisions(self) -> None:
        """Every saved decision (another reviewer's too); a class that a decision named and
        the model does not know is offered from then on."""
        self.decisions = self._saved.refresh()
        for d in self.decisions.values():
            if d.label not in self.classes:
                self.classes.append(d.label)

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
        storage.write_bytes(storage.join(self._saved.folder, name), buf.getvalue())
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
        given one where the output has it (kiln eval's `truth`), else the model's;
        `labeled_by` says which (person, given, model)."""
        out = {"source": [], "path": [], "label": [], "labeled_by": [], "model_label": [],
               "confidence": []}
        if self.has_truth:
            out["truth"] = []
        for r in sorted(self.rows, key=lambda r: (r["source"], r["path"])):
            d = self.decisions.get((r["source"], r["path"]))
            given = r.get("truth") if self.has_truth else None
            label, by = ((d.label, "person") if d else (given, "given") if given is not None
                         else (r["label"], "model"))
            out["source"].append(r["source"])
            out["path"].append(r["path"])
            out["label"].append(label)
            out["labeled_by"].append(by)
            out["model_label"].append(r["label"])
            out["confidence"].append(r["confidence"])
            if self.has_truth:
                out["truth"].append(given)
        return pa.table(out)

    def inputs(self) -> list[str]:
        """The inputs the label job read, as its output records them."""
        job = read_job(self.output) or {}
        return [i for i in job.get("inputs") or () if isinstance(i, str)]


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
    """Writes the final labels to `file` (.parquet, or .csv), whole or not at all, as a new
    file: one that exists, or that lies inside the label output or one of its inputs, is
    refused (pipelines.fence). Returns the rows written."""
    import os

    import pyarrow.csv as pacsv

    from .fence import check_output

    if not str(file).endswith((".parquet", ".csv")):
        raise ValueError(f"--export {file}: name a .parquet or .csv file")
    file = check_output(file, [review.output, *review.inputs()], "--export")
    if storage.exists(file):
        raise ValueError(f"--export {file} exists; kiln writes a new file: choose another name")
    table = review.final_labels()
    buf = io.BytesIO()
    if file.endswith(".csv"):
        pacsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    if storage.is_s3(file):
        storage.write_bytes(file, buf.getvalue())
        return table.num_rows
    tmp = f"{file}.{uuid.uuid4().hex[:8]}.tmp"
    storage.write_bytes(tmp, buf.getvalue())
    try:  # a link fails where a file of that name appeared since: it is never written over
        os.link(tmp, file)
    except FileExistsError:
        raise ValueError(f"--export {file} exists; kiln writes a new file: choose another "
                         "name") from None
    finally:
        os.unlink(tmp)
    return table.num_rows
