"""`kiln label` on a local Ray: every input kind in one run with a model trained here, bad
inputs mixed with good ones, resume after a kill, and the actor used without Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kiln import embedded
from kiln.bulk.label import run_label
from kiln.models import CNNSpec, build_cnn, model_to_bytes
from kiln.options import LabelOptions
from kiln.pipelines import sources, storage
from kiln.pipelines.label import SCHEMA, LabelPredictor, LabelSettings
from kiln.pipelines.resume import make_tasks, resume_plan
from kiln.pipelines.sink import PART_META, OutputDir, OutputError
from kiln.pipelines.transforms import ImagePreset, augment_batch, decode
from kiln.pipelines.units import unit_id
from tests import image_cases as ic
from tests.plain_fit import fit

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def trained(digits_files, tmp_path_factory):
    """An MnistNet trained in-process on the digits for a few seconds (plain PyTorch, through
    the same transforms.decode that labeling uses, shifted as training does); returns its
    model folder."""
    torch.manual_seed(0)
    spec = CNNSpec("mnist_cnn", CLASSES)
    preset = ImagePreset.from_spec(spec)
    recs = [r for u in sources.plan([str(digits_files["tar"])])
            for r in sources.read_unit(u, with_labels=True)]
    x = augment_batch(torch.from_numpy(np.stack([decode(r.data, preset) for r in recs])),
                      "shift")
    y = torch.tensor([CLASSES.index(r.label) for r in recs])
    model = build_cnn("mnist_cnn", 10, 1, 28)
    loss = fit(model, x, y)
    folder = tmp_path_factory.mktemp("model") / "run"
    storage.save_model(str(folder / "model"), model_to_bytes(model, "cnn", spec,
                                                         {"metrics": {"loss": loss}}))
    return folder


def read_rows(output) -> list[dict]:
    return OutputDir(output, {}).read_table().to_pylist()


def test_label_every_input_kind(ray_local, trained, digits_files, tmp_path):
    pngs, truth = digits_files["test_images"], digits_files["test_labels"]
    names = [f"{t}/{i:04d}.png" for i, t in enumerate(truth)]
    q = len(pngs) // 4  # a quarter of the test images into each input kind
    tar = embedded.write_flat_archive(tmp_path / "a.tar", pngs[:q], names[:q])
    zp = embedded.write_flat_archive(tmp_path / "b.zip", pngs[q:2 * q], names[q:2 * q])
    for name, data in zip(names[2 * q:3 * q], pngs[2 * q:3 * q], strict=True):
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_bytes(data)
    pqf = embedded.write_image_parquet(tmp_path / "d.parquet", pngs[3 * q:], ids=names[3 * q:])
    out = tmp_path / "labels"
    opts = LabelOptions(str(trained), [str(tar), str(zp), str(tmp_path / "c"), str(pqf)],
                        str(out), top_k=3, batch_size=64, report=True)
    summary = run_label(opts)

    rows = read_rows(out)
    assert len(rows) == len(pngs) == summary["rows_in"] == summary["rows_written"]
    assert len({(r["source"], r["path"]) for r in rows}) == len(rows)
    assert Counter(r["source"] for r in rows) == {
        str(tar): q, str(zp): q, str(tmp_path / "c"): q, str(pqf): len(pngs) - 3 * q}
    assert pq.read_schema(OutputDir(out, {}).parts()[0]).remove_metadata() == SCHEMA
    by_path = {r["path"]: r for r in rows}
    assert all(r["error"] is None and r["model"] == summary["model"] for r in rows)
    for r in rows:
        assert len(r["top_labels"]) == 3 and r["top_labels"][0] == r["label"]
        assert r["top_scores"] == sorted(r["top_scores"], reverse=True)
        assert abs(r["top_scores"][0] - r["confidence"]) < 1e-6 and sum(r["top_scores"]) <= 1.0001
    accuracy = np.mean([by_path[n]["label"] == t for n, t in zip(names, truth, strict=True)])
    assert accuracy > 0.7, accuracy
    assert summary["errors"] == {} and summary["rows_labeled"] == len(pngs)
    assert sum(summary["labels"].values()) == len(pngs)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["model"] == summary["model"] and on_disk["arguments"]["top_k"] == 3
    page = (out / "report.html").read_text()
    for part in ("label histogram", "confidence histogram", "Least confident 48 images",
                 "<h2>Errors</h2>", "data:image/png;base64,"):
        assert part in page
    # A finished output is complete: the same job run again writes nothing and adds nothing.
    again = run_label(opts)
    assert again["rows_written"] == 0 and again["rows_resumed"] == len(pngs)
    assert len(read_rows(out)) == len(pngs)


def test_label_bad_inputs(ray_local, trained, digits_data, tmp_path):
    pngs, _ = digits_data
    goods = {f"good/{i:03d}.png": pngs[i] for i in range(40)}
    hostile = "bad/<script>alert(1)</script>.txt"
    tar = ic.bad_tar(tmp_path / "bad.tar", {**goods, hostile: b"not an image"})
    tgz = ic.bad_tar(tmp_path / "bad.tgz", goods, "w:gz")
    zp = ic.bad_zip(tmp_path / "bad.zip", goods)
    cut, whole = ic.truncated_tar(tmp_path / "cut.tar", goods)
    root, dir_kinds = ic.bad_dir(tmp_path / "dir", goods)
    odd = tmp_path / "odd.zip"
    embedded.write_flat_archive(odd, list(ic.odd_images().values()), list(ic.odd_images()))
    out = tmp_path / "labels"
    inputs = [tar, tgz, zp, cut, root, odd]
    summary = run_label(LabelOptions(str(trained), [str(i) for i in inputs], str(out),
                                     batch_size=16, overwrite=True, report=True))

    rows = read_rows(out)
    got = {(r["source"], r["path"]): r for r in rows}
    assert len(got) == len(rows) == summary["rows_in"]
    expected = {(str(tar), hostile): "not_image"}
    for src, kinds in ((tar, ic.BAD_TAR_KINDS), (tgz, ic.BAD_TAR_KINDS), (zp, ic.BAD_ZIP_KINDS),
                       (cut, {list(goods)[-1]: "truncated"}), (root, dir_kinds)):
        good = whole if src == cut else [*goods, "bad/good_link.png"] if src == root else goods
        expected.update({(str(src), p): None for p in good})
        expected.update({(str(src), p): k for p, k in kinds.items()})
    expected.update({(str(odd), p): None for p in ic.odd_images()})
    assert set(got) == set(expected)
    for key, kind in expected.items():
        row = got[key]
        if kind is None:  # labeled, every odd image included
            assert row["error"] is None and row["label"] in CLASSES, (key, row["error"])
        else:
            assert row["error"].startswith(f"{kind}: "), (key, row["error"])
            assert row["label"] is None and row["confidence"] is None
    assert summary["errors"] == dict(Counter(k for k in expected.values() if k))
    page = (out / "report.html").read_text()
    assert "bad/bomb.png" in page and "too_large: 8000x8000" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)" in page


def test_resume_after_partial_output(ray_local, trained, digits_data, tmp_path):
    """An interrupted run left some parts and no summary: the re-run writes only the rest."""
    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "d.tar", pngs, labels)  # 1,797 images: 2 units
    out = tmp_path / "labels"
    opts = LabelOptions(str(trained), [str(tar)], str(out))
    run_label(opts)
    parts = OutputDir(out, {}).parts()
    assert len(parts) == 2
    os.remove(out / "summary.json")
    os.remove(sorted(parts)[1])
    killed = out / "part-0123456789abcdef-00001-1234abcd.parquet.89abcdef.tmp"
    killed.write_bytes(b"half a part")  # a write that a killed run never finished
    (out / "notes.tmp").write_bytes(b"the user's")  # not kiln's: it stays
    summary = run_label(dataclasses.replace(opts, report=True))
    rows = read_rows(out)
    assert len(rows) == len({(r["source"], r["path"]) for r in rows}) == len(pngs)
    assert summary["rows_resumed"] + summary["rows_written"] == summary["rows_in"] == len(pngs)
    assert 0 < summary["rows_written"] < len(pngs)
    # The same output as an earlier kiln wrote it (no PART_META in its parts) resumes by its
    # rows' keys, to the same counts.
    for part in OutputDir(out, {}).parts():
        strip_part_meta(part)
    os.remove(out / "summary.json")
    again = run_label(opts)
    assert again["rows_written"] == 0 and again["rows_resumed"] == len(pngs)
    assert (again["labels"], again["errors"]) == (summary["labels"], summary["errors"])
    assert [p.name for p in out.glob("*.tmp")] == ["notes.tmp"]
    page = (out / "report.html").read_text()  # its thumbnails come from both runs
    assert page.count("<img src='data:image/png") == 48 and "(unavailable)" not in page
    with pytest.raises(OutputError, match="differs in: top_k"):
        run_label(LabelOptions(str(trained), [str(tar)], str(out), top_k=2))
    summary = run_label(LabelOptions(str(trained), [str(tar)], str(out), top_k=2,
                                     overwrite=True))
    assert summary["rows_written"] == len(pngs) and summary["rows_resumed"] == 0
    assert (out / "notes.tmp").read_bytes() == b"the user's"  # --overwrite: kiln's files only


def ray_start_failed(stderr: str) -> bool:
    """A local Ray that could not start (it can time out on a very busy machine)."""
    return "ray/_private/worker.py" in stderr and ", in init\n" in stderr


def run_cli(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    for _attempt in range(3):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        if done.returncode == 0 or not ray_start_failed(done.stderr):
            break
    return done


def test_kill_and_resume_cli(trained, digits_data, tmp_path):
    """`python -m kiln label` killed (SIGKILL, whole process group) after some parts are
    written, then run again: every input is in the output exactly once."""
    n = 16_000
    pngs, _ = digits_data
    tar = embedded.write_flat_archive(tmp_path / "big.tar", [pngs[i % len(pngs)]
                                                             for i in range(n)],
                                      [f"{i // 1000:02d}/{i:06d}.png" for i in range(n)])
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "kiln", "label", "--model", str(trained), "--input", str(tar),
           "--output", str(out), "--batch-size", "100"]
    env = {**os.environ, "KILN_OBJECT_STORE_MB": "256"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, which dies with it
    for _attempt in range(3):  # a local Ray can time out starting on a very busy machine
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while not list(out.glob("part-*.parquet")) and proc.poll() is None:
                assert time.monotonic() < deadline, "no part was written"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err = proc.stderr.read().decode()
        if not ray_start_failed(err):
            break
    killed_with = len(list(out.glob("part-*.parquet")))
    assert 0 < killed_with < n // 1000, err[-2000:]
    assert not (out / "summary.json").exists()

    done = run_cli(cmd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "done:" in done.stderr
    rows = read_rows(out)
    assert len(rows) == n
    assert len({r["path"] for r in rows}) == n
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == n and summary["rows_resumed"] >= 1000


def test_in_process_and_ray_give_the_same_rows(ray_local, trained, digits_data, tmp_path):
    """With no Ray running, a job on this machine labels in the command's own process on
    every core; its rows are exactly the Ray actor pool's for the same input: three units,
    odd images (palette, alpha, 16-bit, CMYK, EXIF-rotated, large JPEG) and every hostile
    member kind among them."""
    pngs, _ = digits_data
    goods = {f"{i // 500}/{i:04d}.png": pngs[i % len(pngs)] for i in range(2300)}
    goods.update({f"odd/{name}": data for name, data in ic.odd_images().items()})
    tar = ic.bad_tar(tmp_path / "mixed.tar", goods)
    cmd = [sys.executable, "-m", "kiln", "label", "--model", str(trained), "--input", str(tar),
           "--output", str(tmp_path / "here"), "--top-k", "3", "--batch-size", "100"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = run_cli(cmd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 unit(s) in this process" in done.stderr, done.stderr[-2000:]
    # The test process runs a Ray, so run_label takes the actor pool.
    run_label(LabelOptions(str(trained), [str(tar)], str(tmp_path / "ray"), top_k=3,
                           batch_size=100))

    def rows(out):
        return sorted((r["path"], r["label"], r["confidence"], r["top_labels"],
                       r["top_scores"], r["error"]) for r in read_rows(tmp_path / out))

    here, on_ray = rows("here"), rows("ray")
    assert len(here) == len(goods) + len(ic.BAD_TAR_KINDS)
    assert here == on_ray
    kinds = {r[0]: r[5].split(":")[0] for r in here if r[5]}
    assert kinds == ic.BAD_TAR_KINDS


def test_size_rule_picks_the_process_or_ray(monkeypatch):
    """On a small machine every job runs in the command's process; on a big one, jobs bigger
    than ~15 s of the process's work (or of unknown size) go to Ray; an address, --actors,
    --gpu or a running Ray always choose Ray."""
    import ray

    from kiln.cluster import placement

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    opts = LabelOptions("m", ["i"], "o")
    monkeypatch.setattr(placement, "local_cpus", lambda: 2)
    here = placement.place(opts)
    assert here.runs_here(100, 1000)
    assert here.runs_here(10**9, 1000) and here.runs_here(float("inf"), 1000)
    monkeypatch.setattr(placement, "local_cpus", lambda: 16)
    here = placement.place(opts)
    limit = placement.HERE_MAX_SECONDS * 1000 * 16
    assert here.runs_here(100, 1000) and here.runs_here(limit, 1000)
    assert not here.runs_here(limit + 1, 1000)
    assert not here.runs_here(float("inf"), 1000)
    for choice in ({"actors": 2}, {"address": "ray://head:10001"}):
        assert not placement.place(dataclasses.replace(opts, **choice)).runs_here(100, 1000)
    assert not dataclasses.replace(here, gpu=True).runs_here(100, 1000)
    import torch

    if not torch.cuda.is_available():  # --gpu is checked when placed, on this machine only
        with pytest.raises(ValueError, match="no CUDA GPU"):
            placement.place(dataclasses.replace(opts, gpu=True))
        gpu_on_a_cluster = dataclasses.replace(opts, gpu=True, address="ray://head:10001")
        assert placement.place(gpu_on_a_cluster).cluster  # a cluster's GPUs: counted there
    monkeypatch.setattr(placement, "local_cpus", lambda: 2)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert not placement.place(opts).runs_here(100, 1000)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert not placement.place(opts).runs_here(100, 1000)


def test_predictor_without_ray(trained, digits_data, tmp_path):
    """The actor class is usable on its own: parts per unit, stats per part, names stable."""
    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "d.tar", pngs[:300], labels[:300])
    units = sources.plan([str(tar)], chunk=120)
    settings = LabelSettings(str(trained), str(tmp_path / "out"), "r1", top_k=2, batch_size=50,
                             part_rows=100, thumbs=3)
    predictor = LabelPredictor(settings)
    stats = [s for u in units for s in predictor.label_unit(u, frozenset())]
    assert [s["rows"] for s in stats] == [100, 20, 100, 20, 60]
    assert all(len(s["thumbs"]) == 3 and s["thumbs"][0]["image"].startswith("data:image/png")
               for s in stats)
    assert len({s["part"] for s in stats}) == 5
    again = [s["part"] for u in units for s in predictor.label_unit(u, frozenset())]
    assert again == [s["part"] for s in stats]  # a retried unit overwrites its own parts
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 5


def strip_part_meta(part) -> None:
    """Rewrites a part as a kiln before PART_META wrote it: the same rows, no footer record."""
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({k: v for k, v in
                                                  (table.schema.metadata or {}).items()
                                                  if k != PART_META}), part)


def test_a_resume_reads_the_keys_of_unfinished_units_alone(trained, digits_data, tmp_path,
                                                           monkeypatch):
    """What a re-run reads grows with the parts, not the rows: the footers of every part,
    and the keys of only the parts whose unit is unfinished or whose writer recorded no unit
    (an earlier kiln)."""
    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "d.tar", pngs[:300], labels[:300])
    units = sources.plan([str(tar)], chunk=120)  # 120, 120 and 60 members
    out = tmp_path / "out"
    predictor = LabelPredictor(LabelSettings(str(trained), str(out), "abcd1234", batch_size=50,
                                             part_rows=100))
    stats = {u.index: [s["part"] for s in predictor.label_unit(u, frozenset())] for u in units}
    part = {name: next(out.glob(f"part-{name}-*.parquet")) for names in stats.values()
            for name in names}
    os.remove(part[stats[1][1]])  # unit 1 stopped after its first 100 rows
    strip_part_meta(part[stats[2][0]])  # unit 2 written by an earlier kiln
    ids = [unit_id(u) for u in units]

    written = OutputDir(out, {}).written(["source", "path"])
    assert written.rows == 280 and written.whole_units() == {ids[0]}
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a: read.append(uri) or real(uri, *a))
    whole, done, legacy = resume_plan(written, units)
    assert sorted(map(str, read)) == sorted([str(part[stats[1][0]]), str(part[stats[2][0]])])
    assert whole == {ids[0]} and len(legacy) == 60  # each part read once
    assert len(done) == 160  # unit 1's 100 rows and unit 2's 60: not unit 0's 120
    tasks = make_tasks(units, done, whole)
    import pickle

    assert [(u.index, len(skip)) for u, skip in (pickle.loads(t["task"]) for t in tasks)] == [
        (1, 100)]  # unit 0 by its id, unit 2 by its keys
    unit, skip = pickle.loads(tasks[0]["task"])
    resumed = LabelPredictor(LabelSettings(str(trained), str(out), "efgh5678", batch_size=50,
                                           part_rows=100))  # the re-run's own part names
    assert [s["rows"] for s in resumed.label_unit(unit, skip)] == [20]
    again = OutputDir(out, {}).written(["source", "path"])
    assert again.rows == 300 and again.whole_units() == {ids[0], ids[1]}
    # A part whose footer cannot be read is set aside; which unit it held is unknown, so no
    # unit is whole and every row is skipped by its key.
    part[stats[0][0]].write_bytes(b"not parquet")
    damaged = OutputDir(out, {}).written(["source", "path"])
    assert damaged.whole_units() == set() and damaged.rows == 200
    assert part[stats[0][0]].with_name(part[stats[0][0]].name + ".unreadable").exists()
    whole, done, _ = resume_plan(damaged, units)
    assert [(u.index, len(skip)) for u, skip in (pickle.loads(t["task"]) for t in
                                                 make_tasks(units, done, whole))] == [(0, 20)]


def test_a_sharded_set_is_a_unit_per_tar_and_resumes_by_shard(trained, digits_data, tmp_path):
    """SHARDED_TARS tars or more: a unit each, planned without reading a header; a re-run
    skips the shards that are whole, and reads again the one that changed since."""
    pngs, labels = digits_data
    shards = tmp_path / "shards"
    shards.mkdir()
    n = sources.SHARDED_TARS
    for s in range(n):
        embedded.write_class_tar(shards / f"{s:03d}.tar", pngs[s * 10:(s + 1) * 10],
                                 labels[s * 10:(s + 1) * 10])
    inputs = [str(shards / "*.tar")]
    units = sources.plan(inputs)
    assert [u.kind for u in units] == ["tarshard"] * n and sources.count_known(units) is None
    assert sources.estimated_rows(units) == pytest.approx(10 * n, rel=0.05)  # for placing it
    out = tmp_path / "labels"
    opts = LabelOptions(str(trained), inputs, str(out))
    assert run_label(opts)["rows_in"] == 10 * n
    parts = OutputDir(out, {}).parts()
    for part in parts[:2]:
        os.remove(part)
    os.remove(out / "summary.json")
    again = run_label(opts)
    assert (again["rows_written"], again["rows_resumed"]) == (20, 10 * (n - 2))
    # A shard replaced by other images: its unit is another, and its new members are read.
    embedded.write_flat_archive(shards / "000.tar", pngs[500:505],
                                [f"new/{i}.png" for i in range(5)])
    os.remove(out / "summary.json")
    third = run_label(opts)
    assert (third["rows_written"], third["rows_in"]) == (5, 10 * n + 5)
    rows = read_rows(out)
    assert len(rows) == len({(r["source"], r["path"]) for r in rows}) == 10 * n + 5
    # A shard cut short: the members before the cut, and an error row where it ends.
    whole = (shards / "001.tar").read_bytes()
    (shards / "zzz.tar").write_bytes(whole[:len(whole) // 2])
    os.remove(out / "summary.json")
    fourth = run_label(opts)
    assert fourth["errors"] == {"truncated": 1} and fourth["rows_labeled"] > 10 * n + 5


def test_make_tasks_skips_a_folders_written_files(tmp_path, digits_data):
    """A folder unit's rows are skipped by the keys in its slice alone; one whose every file
    is written is still a task (it lists its folder again: a file deleted since may have let
    another in)."""
    pngs, _ = digits_data
    for i in range(5):
        (tmp_path / "d" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "a" / f"{i}.png").write_bytes(pngs[i])
    src = str(tmp_path / "d")
    units = sources.plan([src], chunk=2)  # a/0-1, a/2-3, a/4
    done = {(src, "a/0.png"), (src, "a/1.png"), (src, "a/2.png"), (src, "b/9.png")}
    import pickle

    got = [pickle.loads(t["task"]) for t in make_tasks(units, done)]
    assert [(u.items[1], sorted(skip)) for u, skip in got] == [
        ("0.png", ["a/0.png", "a/1.png"]), ("2.png", ["a/2.png"]), ("4.png", [])]


def test_make_tasks_skips_done_rows(digits_data, tmp_path):
    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "d.tar", pngs[:30], labels[:30])
    units = sources.plan([str(tar)], chunk=10)
    paths = [[it[0] for it in u.items] for u in units]
    done = {(str(tar), p) for p in paths[0]} | {(str(tar), paths[1][0])}
    tasks = make_tasks(units, done)
    assert len(tasks) == 2  # the first unit is complete
    import pickle

    unit, skip = pickle.loads(tasks[0]["task"])
    assert unit.index == 1 and skip == {paths[1][0]}


def test_s3_inputs_and_output(ray_local, trained, digits_data, s3_bucket, tmp_path):
    """From S3 (a streamed tar, a zip, Parquet) to S3; the summary, the output and what the
    job prints carry no credentials."""
    import io

    from rich.console import Console


    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "a.tar", pngs[:300], labels[:300])
    zp = embedded.write_class_tar(tmp_path / "b.zip", pngs[300:500], labels[300:500])
    pqf = embedded.write_image_parquet(tmp_path / "c.parquet", pngs[500:600])
    for f in (tar, zp, pqf):
        storage.write_bytes(f"{s3_bucket}/in/{f.name}", f.read_bytes())
    out = f"{s3_bucket}/labels"
    printed = io.StringIO()
    run_label(LabelOptions(str(trained), [f"{s3_bucket}/in/*.tar", f"{s3_bucket}/in/b.zip",
                                          f"{s3_bucket}/in/c.parquet"], out, top_k=2,
                           report=True), console=Console(file=printed))
    table = OutputDir(out, {}).read_table()
    assert table.num_rows == 600 and table["error"].null_count == 600
    assert len(set(zip(table["source"].to_pylist(), table["path"].to_pylist(),
                       strict=True))) == 600
    summary = storage.read_bytes(f"{out}/summary.json").decode()
    assert json.loads(summary)["report"] == f"{out}/report.html"
    for text in (summary, printed.getvalue(), storage.read_bytes(f"{out}/_kiln_job.json").decode(),
                 storage.read_bytes(f"{out}/report.html").decode()):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
        assert os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_actor_layout(monkeypatch):
    import ray

    from kiln.bulk.executors import actor_layout

    def cluster(cpus, gpus=0):
        res = {"CPU": cpus, "GPU": gpus}
        monkeypatch.setattr(ray, "cluster_resources", lambda: res)
        monkeypatch.setattr(ray, "available_resources", lambda: res)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": res}])

    cluster(2)
    lay = actor_layout(LabelOptions("m", ["i"], "o"), units=20)
    assert lay.actors * lay.num_cpus < 2 and lay.num_gpus == 0  # room left for Ray Data
    assert actor_layout(LabelOptions("m", ["i"], "o", actors=4), units=2).actors == 2
    cluster(16, 2)
    lay = actor_layout(LabelOptions("m", ["i"], "o", gpu=True), units=100)
    assert (lay.actors, lay.num_gpus) == (2, 1) and lay.decode_threads > 1
    assert lay.actors * lay.num_cpus <= 16
    cluster(8, 0)
    with pytest.raises(ValueError, match="no GPUs"):
        actor_layout(LabelOptions("m", ["i"], "o", gpu=True), units=4)
