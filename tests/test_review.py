"""kiln review: a label output's rows served least-certain first, each decision saved as it is
made (a kill of the server loses none, two reviewers count each row once), the final labels
exported; and the page driven in Debian's Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from kiln import embedded
from kiln.bulk.label import run_label
from kiln.models import CNNSpec, build_model, model_to_bytes
from kiln.options import LabelOptions
from kiln.pipelines import storage
from kiln.pipelines.review import DECISION_SCHEMA, REVIEWS
from kiln.pipelines.sink import OutputDir
from tests.conftest import ROOT
from tests.plain_fit import fit

CLASSES = [str(i) for i in range(10)]
N = 40


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """A label output of 40 digits and one corrupt member, by an MnistNet trained for a
    moment (right often, unsure often)."""
    from kiln.pipelines.transforms import ImagePreset, decode

    torch.manual_seed(0)
    pngs, classes = embedded.digits(28)
    spec = CNNSpec("mnist_cnn", CLASSES)
    net = build_model("cnn", spec)
    x = torch.from_numpy(np.stack([decode(b, ImagePreset.from_spec(spec)) for b in
                                   pngs[200:500]]))
    fit(net, x, torch.tensor([int(c) for c in classes[200:500]]), passes=1, max_batches=3)
    d = tmp_path_factory.mktemp("review")
    storage.save_model(str(d / "run" / "model"), model_to_bytes(net, "cnn", spec))
    members = {f"{c}/{i:03d}.png": b for i, (b, c) in enumerate(zip(pngs[:N], classes[:N],
                                                                      strict=True))}
    members["7/broken.png"] = b"\x89PNG not really"
    tar = _tar(d / "digits.tar", members)
    out = d / "labels"
    run_label(LabelOptions(model=str(d / "run"), inputs=[str(tar)], output=str(out), top_k=3))
    return {"out": out, "dir": d, "truth": {f"{c}/{i:03d}.png": c for i, c in
                                             enumerate(classes[:N])}}


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import tarfile

    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def kiln(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


class Server:
    """`kiln review` in its own process; `url` is the address it printed."""

    def __init__(self, out, reviewer: str, port: int = 0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "review", "--labels", str(out), "--port", str(port),
             "--reviewer", reviewer], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.startswith("review: http://127.0.0.1:"), line + self.proc.stdout.read()
        self.url = line.split()[1].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, body) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/api/decide", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def raw(self, path: str, body, headers: dict) -> tuple[int, str]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def decisions(out) -> list[dict]:
    folder = Path(out) / REVIEWS
    rows = []
    for f in sorted(folder.iterdir()):
        table = pq.read_table(f)
        assert table.schema.equals(DECISION_SCHEMA), f
        rows += table.to_pylist()
    return rows


def parts_bytes(out) -> dict:
    return {p: storage.read_bytes(p) for p in OutputDir(str(out)).parts()}


def test_rows_least_certain_first_decisions_saved_and_survive_a_kill(labels, tmp_path):
    out = labels["out"]
    before = parts_bytes(out)
    ann = Server(out, "ann")
    try:
        page = ann.get("/api/rows?limit=200&unreviewed=0")
        rows = page["rows"]
        assert page["total"] == N and len(rows) == N  # the corrupt member is counted, not shown
        assert page["progress"] == {"rows": N, "errors": 1, "reviewed": 0, "corrected": 0,
                                    "left": N, "model_accuracy": None}
        margins = [r["top_scores"][0] - r["top_scores"][1] for r in rows]
        assert margins == sorted(margins)  # the model's least certain first
        assert page["classes"] == CLASSES and page["sources"] == [str(labels["dir"] /
                                                                      "digits.tar")]
        first, second, third = rows[:3]
        wrong = next(c for c in CLASSES if c != second["label"])
        assert ann.post({"i": first["i"], "action": "accept"})[0] == 200
        assert ann.post({"i": second["i"], "action": "correct", "label": wrong})[0] == 200
        status, got = ann.post({"i": third["i"], "action": "correct", "label": "smudge"})
        assert status == 200 and got["row"]["review"]["label"] == "smudge"
        assert "smudge" in ann.get("/api/rows?limit=1")["classes"]  # a class for the next run
        status, got = ann.post({"i": third["i"], "action": "undo"})
        assert status == 200 and got["row"]["review"] is None
        assert got["progress"] == {"rows": N, "errors": 1, "reviewed": 2, "corrected": 1,
                                   "left": N - 2, "model_accuracy": 0.5}
        # Mistakes are one line each, and save nothing.
        assert ann.post({"i": first["i"], "action": "zap"}) == (
            400, {"error": "unknown action 'zap'; choose one of accept, correct, undo"})
        assert ann.post({"i": N + 5, "action": "accept"})[0] == 400
        assert ann.post({"i": first["i"], "action": "correct", "label": " "})[0] == 400
        assert ann.post([1, 2])[0] == 400
        # Only its own page and scripts: no form or no-cors post from another site (not
        # JSON), no other site's page (Origin), no name rebound to this machine (Host).
        assert ann.raw("/api/decide", {"i": first["i"], "action": "accept"},
                       {"Content-Type": "text/plain"})[0] == 415
        assert ann.raw("/api/decide", {"i": first["i"], "action": "accept"},
                       {"Content-Type": "application/json",
                        "Origin": "http://evil.example"})[0] == 403
        assert ann.raw("/api/rows", None, {"Host": f"evil.example:{ann.port}"})[0] == 403
        status, page_html = ann.raw("/", None, {"Host": f"localhost:{ann.port}"})
        assert status == 200 and "kiln review" in page_html
        assert len(decisions(out)) == 4
        # The rows left to review leave out the reviewed; a filter by predicted class.
        left = ann.get("/api/rows?limit=200")
        assert left["total"] == N - 2 and first["i"] not in {r["i"] for r in left["rows"]}
        by = ann.get(f"/api/rows?limit=200&unreviewed=0&predicted={first['label']}")["rows"]
        assert by and {r["label"] for r in by} == {first["label"]}
        thumbs = ann.get(f"/api/thumbs?i={first['i']},{second['i']}")
        assert all(v.startswith("data:image/png;base64,") for v in thumbs.values())
        ann.kill()  # mid-review: every answered decision is on disk

        bob = Server(out, "bob")
        ann = Server(out, "ann")
        assert bob.get("/api/progress")["reviewed"] == 2
        assert bob.post({"i": rows[3]["i"], "action": "accept"})[0] == 200
        # Two reviewers on one output: each sees the other's decisions, each row counts once.
        assert ann.post({"i": rows[3]["i"], "action": "accept"})[0] == 200
        assert ann.get("/api/progress")["reviewed"] == 3 == bob.get("/api/progress")["reviewed"]
        saved = decisions(out)
        assert [(d["action"], d["reviewer"]) for d in saved] == [
            ("accept", "ann"), ("correct", "ann"), ("correct", "ann"), ("undo", "ann"),
            ("accept", "bob"), ("accept", "ann")]
        assert saved[1]["label"] == wrong and saved[1]["model_label"] == second["label"]
        assert all(d["at"] is not None for d in saved)
        # A port that another server holds is one line.
        busy = kiln("review", "--labels", out, "--port", ann.port)
        assert busy.returncode == 2 and "in use" in busy.stderr
    finally:
        for s in ("ann", "bob"):
            server = locals().get(s)
            if server is not None and server.proc.poll() is None:
                server.kill()
    assert parts_bytes(out) == before  # the label output's own rows are untouched

    # The final labels: the person's where reviewed, the model's elsewhere.
    final = tmp_path / "final.csv"
    res = kiln("review", "--labels", out, "--export", final)
    assert res.returncode == 0, res.stdout + res.stderr
    table = pacsv.read_csv(final, convert_options=pacsv.ConvertOptions(
        column_types={"label": "string", "model_label": "string"})).to_pylist()
    assert len(table) == N
    by_path = {r["path"]: r for r in table}
    assert by_path[second["path"]]["label"] == wrong
    assert by_path[second["path"]]["labeled_by"] == "person"
    assert by_path[third["path"]]["labeled_by"] == "model"  # undone
    assert sum(r["labeled_by"] == "person" for r in table) == 3
    assert pq.read_table(_export(out, tmp_path / "final.parquet")).num_rows == N
    again = kiln("review", "--labels", out, "--export", final)
    assert again.returncode == 2 and "exists" in again.stderr
    inside = kiln("review", "--labels", out, "--export", out / "final.csv")
    assert inside.returncode == 2 and "lies inside" in inside.stderr
    assert not (out / "final.csv").exists()
    # The output still resumes as a label output: its reviews are not parts.
    summary = run_label(LabelOptions(model=str(labels["dir"] / "run"),
                                     inputs=[str(labels["dir"] / "digits.tar")],
                                     output=str(out), top_k=3))
    assert summary["rows_resumed"] == N + 1 and summary["rows_written"] == 0


def _export(out, file: Path) -> Path:
    res = kiln("review", "--labels", out, "--export", file)
    assert res.returncode == 0, res.stdout + res.stderr
    return file


def test_what_is_not_a_label_output_is_one_line(tmp_path, labels):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for folder in (tmp_path / "notes", tmp_path / "nothing-here", labels["dir"] / "run"):
        res = kiln("review", "--labels", folder)
        assert res.returncode == 2 and "is not a label output" in res.stderr, res.stderr
    res = kiln("review", "--labels", labels["out"], "--export", tmp_path / "final.txt")
    assert res.returncode == 2 and ".parquet or .csv" in res.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium")
def test_the_page_in_chromium_keys_reload_and_a_killed_server(labels, tmp_path):
    """Headless Chromium presses the page's keys; each decision is on disk before the next,
    a reload shows them, and a server killed and started again loses none."""
    from playwright.sync_api import sync_playwright

    out = tmp_path / "labels"
    shutil.copytree(labels["out"], out, ignore=shutil.ignore_patterns(REVIEWS, "_kiln_lease*"))
    server = Server(out, "cara")
    try:
        order = [r["i"] for r in server.get("/api/rows?limit=24")["rows"]]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(),
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector(".card.current")
            cards = page.locator(".card")
            assert [int(cards.nth(k).get_attribute("data-i")) for k in range(len(order))] == order
            page.wait_for_selector(".card img")  # read again from the archive

            def reviewed() -> str:
                return page.locator("#progress").get_attribute("data-reviewed")

            rows = {r["i"]: r for r in server.get("/api/rows?limit=24")["rows"]}
            page.keyboard.press("a")  # the first card: the model is right
            page.wait_for_function("document.getElementById('progress').dataset.reviewed==='1'")
            assert page.locator(".card.current").get_attribute("data-i") == str(order[1])
            other = next(c for c in CLASSES if c != rows[order[1]]["label"])
            page.keyboard.press(other)  # the second: that digit's class
            page.wait_for_function("document.getElementById('progress').dataset.reviewed==='2'")
            assert page.locator(".card").nth(1).locator(".status").inner_text() == f"→ {other}"
            page.keyboard.press("u")  # undo the second
            page.wait_for_function("document.getElementById('progress').dataset.reviewed==='1'")
            page.keyboard.press("s")  # skip: nothing saved
            page.keyboard.press("/")
            page.keyboard.type("smudge")
            page.keyboard.press("Enter")  # any class, by name
            page.wait_for_function("document.getElementById('progress').dataset.reviewed==='2'")
            assert [(d["action"], d["label"]) for d in decisions(out)] == [
                ("accept", rows[order[0]]["label"]), ("correct", other), ("undo", None),
                ("correct", "smudge")]
            page.reload()
            page.wait_for_selector(".card.current")
            assert reviewed() == "2" and page.locator("#progress").get_attribute(
                "data-corrected") == "1"
            shown = {int(cards.nth(k).get_attribute("data-i")) for k in range(cards.count())}
            assert order[0] not in shown and order[1] in shown  # left to review: undone

            server.kill()
            server = Server(out, "cara", port=server.port)  # started again, same address
            page.reload()
            page.wait_for_selector(".card.current")
            assert reviewed() == "2"
            page.keyboard.press("a")
            page.wait_for_function("document.getElementById('progress').dataset.reviewed==='3'")
            # The next page of rows to review starts after this page's skipped rows.
            shown = [int(cards.nth(k).get_attribute("data-i")) for k in range(cards.count())]
            left = [r["i"] for r in server.get("/api/rows?limit=200")["rows"]]
            still = [i for i in shown if i in set(left)]
            assert len(shown) == 24 and len(still) == 23
            page.keyboard.press("n")
            page.wait_for_function("document.querySelector('.card') && "
                                   f"document.querySelector('.card').dataset.i === "
                                   f"'{left[len(still)]}'")
            browser.close()
        assert len(decisions(out)) == 5
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert os.path.exists(out / "summary.json")


def test_reviewed_rows_are_training_data_read_from_their_source(labels, tmp_path, ray_local):
    """`kiln train cnn --data LABELS` trains on the reviewed rows alone, each image read again
    from its source with the person's label (a new class too); with --init, from the model
    that labeled them."""
    from kiln.options import TrainOptions
    from kiln.pipelines import sources
    from kiln.pipelines.review import Review
    from kiln.pipelines.train_data import check_image_source
    from kiln.train.job import run_train

    out = tmp_path / "labels"
    shutil.copytree(labels["out"], out, ignore=shutil.ignore_patterns(REVIEWS, "_kiln_lease*"))
    with pytest.raises(ValueError, match="review rows of at least 2 classes first"):
        check_image_source(str(out))
    review = Review(str(out))
    rows = review.rows
    wanted = {}
    for k, row in enumerate(rows[:12]):
        if k == 1:
            review.decide(k, "correct", "smudge", "dee")
            wanted[row["path"]] = "smudge"
        elif k == 11:  # decided, then undone: not training data
            review.decide(k, "accept", None, "dee")
            review.decide(k, "undo", None, "dee")
        else:
            truth = labels["truth"][row["path"]]
            review.decide(k, "correct" if truth != row["label"] else "accept", truth, "dee")
            wanted[row["path"]] = truth
    units, count = check_image_source(str(out))
    assert count == len(wanted) == 11
    records = [r for u in units for r in sources.read_unit(u, with_labels=True)]
    assert {r.path: r.label for r in records} == wanted
    with tarfile.open(labels["dir"] / "digits.tar") as t:
        assert all(r.data == t.extractfile(r.path).read() for r in records)

    # kiln eval scores a model on the person's labels the same way.
    from kiln.bulk.eval import run_eval
    from kiln.options import EvalOptions

    run_eval(EvalOptions(model=str(labels["dir"] / "run"), data=str(out),
                         output=str(tmp_path / "scored")))
    figures = json.loads((tmp_path / "scored" / "eval.json").read_text())
    model_said = {r["path"]: r["label"] for r in rows}
    assert figures["images"] == 11
    assert figures["accuracy"] == pytest.approx(
        sum(model_said[p] == label for p, label in wanted.items()) / 11)

    tuned = tmp_path / "tuned"
    run_train(TrainOptions("cnn", str(out), str(tuned), init=str(labels["dir"] / "run"),
                           max_steps=2, batch_size=4, workers=1, val_fraction=0.2))
    card = storage.read_model_config(str(tuned))
    assert set(card["spec"]["classes"]) == set(wanted.values())
    assert "smudge" in card["spec"]["classes"] and card["train"]["init"]["from"] == str(
        labels["dir"] / "run")

    # A source that moved: its reviewed rows are error rows naming why, not a crash.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(out, moved / "labels")
    (labels["dir"] / "digits.tar").rename(labels["dir"] / "elsewhere.tar")
    try:
        records = [r for u in check_image_source(str(moved / "labels"))[0]
                   for r in sources.read_unit(u, with_labels=True)]
    finally:
        (labels["dir"] / "elsewhere.tar").rename(labels["dir"] / "digits.tar")
    assert len(records) == 11 and all(r.error.startswith("missing: its source is gone")
                                      for r in records)


def test_an_eval_output_shows_the_contradicted_labels_first_and_exports_the_given(labels,
                                                                                  tmp_path):
    """On kiln eval's output (a truth column) the rows whose given label the model
    contradicts come first, the most confident first; the export keeps the given labels where
    no one reviewed."""
    from kiln.bulk.eval import run_eval
    from kiln.options import EvalOptions
    from kiln.pipelines.review import Review, export

    out = tmp_path / "eval"
    run_eval(EvalOptions(model=str(labels["dir"] / "run"), data=str(labels["dir"] /
                                                                      "digits.tar"),
                         output=str(out)))
    review = Review(str(out))
    wrong = [r for r in review.rows if r["truth"] != r["label"]]
    assert wrong and review.rows[:len(wrong)] == sorted(wrong, key=lambda r: -r["confidence"])
    rest = review.rows[len(wrong):]
    margins = [r["top_scores"][0] - r["top_scores"][1] for r in rest]
    assert margins == sorted(margins)
    review.decide(0, "accept", None, "eve")  # the model was right after all
    assert export(review, str(tmp_path / "final.parquet")) == N
    final = {r["path"]: r for r in pq.read_table(tmp_path / "final.parquet").to_pylist()}
    assert final[review.rows[0]["path"]]["labeled_by"] == "person"
    assert final[review.rows[0]["path"]]["label"] == review.rows[0]["label"]
    others = [r for p, r in final.items() if p != review.rows[0]["path"]]
    assert all(r["labeled_by"] == "given" and r["label"] == r["truth"] for r in others)


def test_a_review_of_an_s3_output_saves_reads_and_exports_there(labels, s3_bucket):
    """The same review on S3 (the moto server): decisions as objects under reviews/, read
    back by a second reader, the export an object beside them that is never written over."""
    from kiln.pipelines.review import Review, export, read_decisions

    out = f"{s3_bucket}/labels"
    run_label(LabelOptions(model=str(labels["dir"] / "run"),
                           inputs=[str(labels["dir"] / "digits.tar")], output=out, top_k=3))
    review = Review(out + "/")  # as a user types it
    first, second = review.rows[:2]
    review.decide(0, "accept", None, "fay")
    review.decide(1, "correct", "smudge", "fay")
    again = read_decisions(out)
    assert {k: d.label for k, d in again.items()} == {
        (first["source"], first["path"]): first["label"],
        (second["source"], second["path"]): "smudge"}
    assert len(storage.list_dir(f"{out}/{REVIEWS}")) == 2
    assert export(review, f"{s3_bucket}/final.parquet") == N
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/final.parquet")))
    assert sorted(table["labeled_by"].to_pylist()).count("person") == 2
    with pytest.raises(ValueError, match="exists"):
        export(review, f"{s3_bucket}/final.parquet")
    with pytest.raises(ValueError, match="overlap.*choose another --export"):
        export(review, f"{out}/final.parquet")
