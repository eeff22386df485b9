"""Nothing a user types destroys data: outputs kiln refuses, --overwrite that deletes only
kiln's files, one writer per output (local disk and S3), names that are not UTF-8 and names
that repeat, bounded memory, model folders checked before they are built. As a user runs
them: real files, real archives, the command line where the message is the point."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kiln import embedded
from kiln.bulk.label import run_label
from kiln.models import CNNSpec, ModelFolderError, RNNSpec, build_model, model_to_bytes
from kiln.options import LabelOptions
from kiln.pipelines import names, s3, storage
from kiln.pipelines.fence import FenceError
from kiln.pipelines.lease import Lease, LeaseError
from kiln.pipelines.sink import OutputDir, OutputError
from tests.conftest import ROOT

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained MNIST net as a run folder: labels need not be right here, only present."""
    spec = CNNSpec("mnist_cnn", CLASSES)
    folder = tmp_path_factory.mktemp("model") / "run"
    storage.save_model(str(folder / "model"), model_to_bytes(build_model("cnn", spec), "cnn",
                                                             spec))
    return folder


@pytest.fixture(scope="module")
def pngs():
    images, _ = embedded.digits(28)
    return images


def kiln(*args, cwd=ROOT, env=None, timeout=180):
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**base, **(env or {}),
                                                                   "PYTHONPATH": str(ROOT)})


def rows(out) -> list[dict]:
    return OutputDir(str(out)).read_table().to_pylist()


def label(model, inputs, out, **kw) -> dict:
    return run_label(LabelOptions(str(model), [str(i) for i in inputs], str(out), **kw))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ outputs kiln refuses


def test_output_root_is_refused_and_the_working_directory_is_untouched(model, pngs, tmp_path):
    """`cd project && kiln label ... --output / --overwrite` deleted the project; now it is
    one line, exit 2, before anything is read or written."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    tar = embedded.write_flat_archive(project / "in.tar", pngs[:5], [f"{i}.png" for i in
                                                                      range(5)])
    before = snapshot(project)
    for out in ("/", ".", "..", str(project), "~", str(tmp_path)):
        res = kiln("label", "--model", model, "--input", tar, "--output", out, "--overwrite",
                   cwd=project, env={"HOME": str(project)})
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1, (out, res.stderr)
        assert lines[0].startswith("error: --output") and "folder of its own" in lines[0] \
            or "holds the input" in lines[0], lines
    assert snapshot(project) == before


@pytest.mark.parametrize("where", ["equals", "inside", "holds", "glob"])
def test_an_output_that_overlaps_an_input_is_refused(model, pngs, tmp_path, where):
    images = tmp_path / "P" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(pngs[i])
    given, out = {"equals": (images, images), "inside": (images, images / "labels"),
                  "holds": (images, tmp_path / "P"),
                  "glob": (f"{tmp_path}/P/*", tmp_path / "P" / "labels")}[where]
    before = snapshot(tmp_path)
    with pytest.raises(FenceError, match="input"):
        label(model, [given], out, overwrite=True)
    assert snapshot(tmp_path) == before and not (tmp_path / "P" / "labels").exists()
    with pytest.raises(FenceError, match="input"):  # the model is an input too
        label(model, [images], model / "labels")


def test_overwrite_deletes_only_kilns_files(model, pngs, tmp_path):
    """A folder kiln did not write is refused, --overwrite or not; a kiln output keeps the
    user's own files through --overwrite."""
    tar = embedded.write_flat_archive(tmp_path / "in.tar", pngs[:20], [f"{i}.png" for i in
                                                                        range(20)])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    (theirs / "summary.json").write_text("{}")  # a name kiln uses, but not kiln's folder
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a kiln output"):
            label(model, [tar], theirs, overwrite=overwrite)
    assert sorted(p.name for p in theirs.iterdir()) == ["summary.json", "thesis.tex"]

    out = tmp_path / "labels"
    label(model, [tar], out)
    (out / "notes.txt").write_text("my notes on these labels")
    (out / "sub").mkdir()
    (out / "sub" / "part-0000000000-00000-abcdef01.parquet").write_bytes(b"mine")
    summary = label(model, [tar], out, overwrite=True, top_k=2)
    assert summary["rows_written"] == 20 and len(rows(out)) == 20
    assert (out / "notes.txt").read_text() == "my notes on these labels"
    assert (out / "sub" / "part-0000000000-00000-abcdef01.parquet").read_bytes() == b"mine"


def test_a_run_folder_is_kilns_or_refused(tmp_path):
    """train and tune wrote over a folder's own metrics.jsonl and model/config.json because
    their names were kiln's; a run folder is now new, empty, or marked by its kind."""
    from kiln.pipelines.fence import check_run_folder, mark_run_folder

    theirs = tmp_path / "theirs"
    (theirs / "model").mkdir(parents=True)
    (theirs / "metrics.jsonl").write_text("mine")
    for kind in ("train", "tune"):
        with pytest.raises(FenceError, match="holds files that kiln did not write"):
            check_run_folder(str(theirs), [], kind)
    run = tmp_path / "run"
    assert check_run_folder(str(run), [], "train") == str(run)
    run.mkdir()
    mark_run_folder(str(run), "train")
    (run / "labels").mkdir()  # a label job's output beside the run: the run stays resumable
    assert check_run_folder(str(run), [], "train") == str(run)
    with pytest.raises(FenceError, match="holds a kiln train folder, not a tune one"):
        check_run_folder(str(run), [], "tune")
    res = kiln("demo", "--small", "--out", "~", env={"HOME": str(theirs)})
    assert res.returncode == 2 and "is the home folder" in res.stderr
    assert (theirs / "metrics.jsonl").read_text() == "mine"


def test_a_kill_during_overwrite_leaves_an_output_that_resumes(model, pngs, tmp_path,
                                                               monkeypatch):
    """A kill while --overwrite deleted the old parts once left parts without a marker: an
    output refused forever. The marker now goes last: the old job's output stays whole."""
    tar = embedded.write_flat_archive(tmp_path / "in.tar", pngs[:1500],
                                      [f"{i:04d}.png" for i in range(1500)])
    out = tmp_path / "labels"
    label(model, [tar], out)
    real, calls = storage.delete_file, []

    def killed_after_one(uri):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(uri)
        real(uri)

    monkeypatch.setattr(storage, "delete_file", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        label(model, [tar], out, overwrite=True, top_k=2)
    monkeypatch.setattr(storage, "delete_file", real)
    assert (out / "_kiln_job.json").exists() and len(list(out.glob("part-*"))) == 1
    resumed = label(model, [tar], out)  # the old job, resumed
    assert resumed["rows_in"] == 1500 == len(rows(out)) and resumed["rows_written"] > 0
    again = label(model, [tar], out, overwrite=True, top_k=2)
    assert again["rows_written"] == 1500 == len(rows(out))


def test_the_lease_follows_no_link(model, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_kiln_lease.json").symlink_to(precious)
    with pytest.raises(storage.StorageError, match="cannot write there"):
        label(model, [embedded.write_flat_archive(tmp_path / "a.tar", [b"x"], ["x.png"])], out)
    assert precious.read_text() == "mine"


# ------------------------------------------------------------------ one writer per output


def _big_tar(path: Path, pngs: list[bytes], n: int) -> Path:
    return embedded.write_flat_archive(path, [pngs[i % len(pngs)] for i in range(n)],
                                       [f"{i // 1000:02d}/{i:06d}.png" for i in range(n)])


def test_a_second_job_on_a_held_output_is_refused_and_no_row_is_lost(model, pngs, tmp_path):
    """The same `kiln label` started twice: both once exited 0 and rows were lost. Now a
    second one, --overwrite or not, is refused with one line naming the first while it runs;
    the first killed, its lease passes to the rerun, which finishes: every row once."""
    n = 40_000
    tar = _big_tar(tmp_path / "big.tar", pngs, n)
    out = tmp_path / "labels"
    args = ["label", "--model", str(model), "--input", str(tar), "--output", str(out)]
    # --batch-size 1: the first job runs long enough to be there when the others come.
    first = subprocess.Popen([sys.executable, "-m", "kiln", *args, "--batch-size", "1"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = kiln(*args)
        third = kiln(*args, "--overwrite")
        assert first.poll() is None, "the first job ended before the others were refused"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    for res in (second, third):
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "is being written by another kiln job (label, pid" in lines[0]
        assert f"pid {first.pid} " in lines[0]
    assert 0 < len(rows(out)) < n
    rerun = kiln(*args)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr[-2000:]
    got = rows(out)
    assert len(got) == n == len({r["path"] for r in got})
    assert json.loads((out / "summary.json").read_text())["rows_in"] == n


def test_a_lease_on_s3(s3_bucket, monkeypatch):
    """On S3: a live holder refuses a second job; a dead holder of this machine passes its
    lease on at once; another machine's lapses after TTL_S unrenewed; a holder whose lease
    was taken stops."""
    from kiln.pipelines import lease as lease_mod

    folder = f"{s3_bucket}/out"
    a = Lease(folder, "label", "run0000a").acquire()
    with pytest.raises(LeaseError, match=r"being written by another kiln job \(label, pid"):
        Lease(folder, "label", "run0000b").acquire()
    a.release()
    b = Lease(folder, "label", "run0000b").acquire()  # released: free at once
    b._stop.set()  # b dies without a word: its process is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    client = s3.s3_client()
    bucket, key = s3.s3_bucket_key(b.uri)
    record = {**b.record(), "pid": int(dead), "pid_start": "1"}
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode())
    c = Lease(folder, "label", "run0000c").acquire()
    assert c.taken_from["pid"] == int(dead)
    c._stop.set()
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(
        {**record, "host": "another-machine", "run": "elsewhere"}).encode())
    with pytest.raises(LeaseError, match="lapses in"):
        Lease(folder, "label", "run0000d").acquire()
    monkeypatch.setattr(lease_mod, "TTL_S", 0.0)
    monkeypatch.setattr(lease_mod, "RENEW_S", 0.2)
    d = Lease(folder, "label", "run0000d").acquire()
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(  # another job took it over
        {**record, "host": "another-machine", "run": "thief"}).encode())
    deadline = time.monotonic() + 10
    while d.lost is None:
        assert time.monotonic() < deadline, "the lost lease went unnoticed"
        time.sleep(0.1)
    with pytest.raises(LeaseError, match="took this output over"):
        d.check()
    d.release()


# ------------------------------------------------------------------ every name is a row


LATIN1 = "caf\udce9.png"  # b"caf\xe9.png": a Latin-1 name, as Python holds it


class _RawName(zipfile.ZipInfo):
    """A zip entry whose name is written as the bytes given, with the flags given."""

    __slots__ = ("raw", "flags")

    def _encodeFilenameFlags(self):  # noqa: N802 (zipfile's own name)
        return self.raw, self.flags


def _latin1_zip(path: Path, members: list[tuple[bytes, bytes]], flags: int = 0) -> Path:
    """A zip whose names are raw bytes without the UTF-8 flag, as old tools wrote them (or,
    `flags` 0x800, flagged UTF-8 though they are not, as broken tools write them)."""
    with zipfile.ZipFile(path, "w") as zf:
        for raw, data in members:
            info = _RawName(raw.decode("cp437"))
            info.raw, info.flags = raw, flags
            zf.writestr(info, data)
    return path


def test_names_that_are_not_utf8_are_rows_and_resume(model, pngs, tmp_path):
    """A tar member, a zip entry and a file named b"caf\\xe9.png" once aborted the whole
    job on every rerun; now each is a row whose path keeps the bytes (\\xe9), and a rerun
    finds them done."""
    tar = tmp_path / "old.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as t:
        for name, data in ((LATIN1, pngs[0]), ("ok.png", pngs[1]), ("d\udcff/x.png", pngs[2])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    z = _latin1_zip(tmp_path / "old.zip", [(b"caf\xe9.png", pngs[3]), (b"ok.png", pngs[4])])
    flagged = _latin1_zip(tmp_path / "flagged.zip", [(b"caf\xe9.png", pngs[7]),
                                                     (b"ok.png", pngs[8])], flags=0x800)
    folder = tmp_path / "dir"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/caf\xe9.png", "wb") as f:
        f.write(pngs[5])
    (folder / "ok.png").write_bytes(pngs[6])
    out = tmp_path / "labels"
    summary = label(model, [tar, z, flagged, folder], out)
    assert summary["rows_in"] == 9 and summary["error_rows"] == 0
    paths = sorted(r["path"] for r in rows(out))
    assert paths == sorted(['"caf\\xe9.png"'] * 4 + ["ok.png"] * 4 + ['"d\\xff/x.png"'])
    assert names.parse('"caf\\xe9.png"') == (LATIN1, 1)
    os.remove(sorted(out.glob("part-*.parquet"))[0])
    again = label(model, [tar, z, flagged, folder], out)
    assert again["rows_resumed"] > 0 and again["rows_in"] == 9 and len(rows(out)) == 9


def test_a_name_twice_is_two_rows_with_their_own_images(model, pngs, tmp_path):
    """A tar appended to, a zip with two entries of a name, a Parquet `path` repeated across
    row groups: once one row (and on resume one lost), now each is a row of its own."""
    bad = b"not an image"
    tar = tmp_path / "twice.tar"
    with tarfile.open(tar, "w") as t:
        for data in (pngs[0], bad, pngs[1]):
            info = tarfile.TarInfo("a.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    z = tmp_path / "twice.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", pngs[0])
        zf.writestr("a.png", bad)
    table = pa.table({"image": [pngs[0], bad, pngs[2], pngs[3]], "path": ["p", "p", "q", "p"]})
    pq.write_table(table, tmp_path / "twice.parquet", row_group_size=2)
    out = tmp_path / "labels"
    label(model, [tar, z, tmp_path / "twice.parquet"], out)
    got = {(Path(r["source"]).name, r["path"]): r["error"] for r in rows(out)}
    assert got.keys() == {("twice.tar", "a.png"), ("twice.tar", '"a.png"#2'),
                          ("twice.tar", '"a.png"#3'), ("twice.zip", "a.png"),
                          ("twice.zip", '"a.png"#2'), ("twice.parquet", "p"),
                          ("twice.parquet", '"p"#2'), ("twice.parquet", "q"),
                          ("twice.parquet", '"p"#3')}
    # Each row has its own image: the bad one is the error row, wherever it sits.
    assert {k for k, e in got.items() if e} == {("twice.tar", '"a.png"#2'),
                                                ("twice.zip", '"a.png"#2'),
                                                ("twice.parquet", '"p"#2')}
    for part in sorted(out.glob("part-*.parquet")):
        part.unlink()
        break
    again = label(model, [tar, z, tmp_path / "twice.parquet"], out)
    assert again["rows_in"] == 9 and len(rows(out)) == 9


def test_parquet_keys_of_every_type_are_rows_that_resume(model, pngs, tmp_path):
    """Float, bool and binary `id`/`path` values, and nulls beside a real `row-1`: once
    paths that repeated and a resume that lost rows while saying it was complete."""
    tables = {
        "float": pa.table({"image": pngs[:6], "id": [float(i % 3) for i in range(6)]}),
        "bool": pa.table({"image": pngs[:4], "id": [True, False, True, True]}),
        "binary": pa.table({"image": pngs[:4], "path": pa.array(
            [b"a.png", b"caf\xe9.png", b"a.png", None], pa.binary())}),
        "nulls": pa.table({"image": pngs[:4], "path": ["row-1", None, "row-1", None]}),
    }
    inputs = []
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet", row_group_size=2)
        inputs.append(tmp_path / f"{name}.parquet")
    out = tmp_path / "labels"
    label(model, inputs, out)
    got = {}
    for r in rows(out):
        got.setdefault(Path(r["source"]).stem, []).append(r["path"])
    assert sorted(got["float"]) == sorted(["0.0", "1.0", "2.0", '"0.0"#2', '"1.0"#2',
                                           '"2.0"#2'])
    assert sorted(got["bool"]) == sorted(["True", "False", '"True"#2', '"True"#3'])
    assert sorted(got["binary"]) == sorted(["a.png", '"caf\\xe9.png"', '"a.png"#2',
                                            '"row-3"'])
    assert sorted(got["nulls"]) == sorted(["row-1", '"row-1"', '"row-1"#2', '"row-3"'])
    for part in sorted(out.glob("part-*.parquet"))[::2]:
        part.unlink()
    again = label(model, inputs, out)
    assert again["rows_in"] == 18 == len(rows(out)) and again["rows_written"] > 0


def test_a_parquet_row_group_too_large_to_read_is_an_error_row(monkeypatch, pngs, tmp_path):
    """A 4 KB Parquet file of zeros inflated to gigabytes; a row group bigger than
    MAX_GROUP_BYTES uncompressed is now an error row, the other groups are read."""
    from kiln.pipelines import sources

    monkeypatch.setattr(sources, "MAX_GROUP_BYTES", 8 * 1024 * 1024)
    images = [pngs[0], pngs[1]] + [bytes([i]) * (5 * 1024 * 1024) for i in range(4)]
    pq.write_table(pa.table({"image": images}), tmp_path / "z.parquet", row_group_size=2,
                   compression="zstd", use_dictionary=False)
    recs = [(r.path, r.error) for u in sources.plan([str(tmp_path / "z.parquet")])
            for r in sources.read_unit(u)]
    assert recs[:2] == [("row-0", None), ("row-1", None)]
    assert [p for p, _ in recs[2:]] == ["<row group 1>", "<row group 2>"]
    assert all(e.startswith("too_large: a row group of") for _, e in recs[2:])


# ------------------------------------------------------------------ memory with bounds


def _peak_rss_mb(cmd: list[str]) -> tuple[int, float]:
    """(exit code, the peak resident memory of the command's process in MB)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode;"
            "print(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    rc, mb = res.stdout.split()[-2:]
    return int(rc), float(mb)


def test_an_archive_bomb_is_read_a_few_members_at_a_time(model, pngs, tmp_path):
    """A 1 MB zip inflating to 640 MB (16 members of 40 MB of zeros) once took 320 MB more
    per batch; now a batch holds at most BATCH_BYTES (one member alone may hold more)."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", pngs[0])
        for i in range(16):
            zf.writestr(f"zero{i:02d}.png", b"\0" * (40 * 1024 * 1024))
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", pngs[0])
    assert bomb.stat().st_size < 2 * 1024 * 1024
    peaks = {}
    for name, src in (("small", small), ("bomb", bomb)):
        cmd = [sys.executable, "-m", "kiln", "label", "--model", str(model), "--input",
               str(src), "--output", str(tmp_path / name)]
        rc, peaks[name] = _peak_rss_mb(cmd)
        assert rc == 0
    assert len(rows(tmp_path / "bomb")) == 17
    # Two decode threads each holding a batch of one or two 40 MB members, and their
    # decoders' copies: well under the 320 MB a batch took before, let alone 640.
    assert peaks["bomb"] - peaks["small"] < 260, peaks


def test_a_large_16_bit_image_decodes_in_bounded_memory():
    """A 7000x7000 16-bit PNG cost 1.2 GB in float64 copies; now about its own size again."""
    import tracemalloc

    from kiln.pipelines.transforms import ImagePreset, decode_uint8

    ramp = (np.arange(7000, dtype=np.uint32)[None, :] * 9 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(ramp, 7000, axis=0)).save(buf, "PNG")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        x = decode_uint8(data, ImagePreset(28, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (1, 28, 28) and x.max() > 200
    assert peak < 250 * 1024 * 1024, peak / 1e6  # the image's own 98 MB, and 14 MB of rows


# ------------------------------------------------------------------ model folders


def _model_folder(tmp_path: Path, config_edit=None, weights: bytes | None = None) -> Path:
    spec = CNNSpec("mnist_cnn", ["a", "b"])
    files = model_to_bytes(build_model("cnn", spec), "cnn", spec)
    config = json.loads(files["config.json"])
    if config_edit:
        config_edit(config)
    folder = tmp_path / "m"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "weights.safetensors").write_bytes(files["weights.safetensors"]
                                                 if weights is None else weights)
    return folder


def _rnn_folder(tmp_path: Path) -> Path:
    """A small, sound char-RNN folder: the baseline an RNN config's load is held against (the
    first RNN a process builds, even on the meta device, maps ~150 MB of kernels once)."""
    spec = RNNSpec(["a", "b"], hidden=8, layers=1, embed=4)
    folder = tmp_path / "rnn"
    storage.save_model(str(folder), model_to_bytes(build_model("rnn", spec), "rnn", spec))
    return folder


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["spec"].update(classes=[0, 1]), "classes must be a list of strings"),
    (lambda c: c.update(format_version="2"), "format_version must be a whole number"),
    (lambda c: c["spec"].update(std=[0]), "std must be 1 number(s) from 0.0001 to 100"),
    (lambda c: c["spec"].update(mean=[1e308]), "mean must be 1 number(s) from -100 to 100"),
    (lambda c: c.update(id="x" * 10**6), "\"id\" must be text of 1 to 200 characters"),
    (lambda c: c["spec"].update(image_size=300), "does not match config.json"),
    (lambda c: c["spec"].update(image_size=10**6), "image_size must be a whole number"),
    (lambda c: c.update(kind="rnn", spec={"vocab": ["a"], "layers": 10**6}),
     "layers must be a whole number from 1 to 64"),
    (lambda c: c.update(kind="rnn", spec={"vocab": ["a"], "hidden": 4096}),
     "does not match config.json"),
])
def test_a_bad_model_config_is_one_line_before_anything_is_built(tmp_path, edit, expected):
    folder = _model_folder(tmp_path, edit)
    with pytest.raises(ModelFolderError, match=re.escape(expected)):
        storage.load_model(str(folder))
    res = kiln("info", folder)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and expected in res.stderr
    if "does not match" in expected:
        # Nothing the size of the model it describes was made (image_size 300: 700 MB).
        rnn = json.loads((folder / "config.json").read_text())["kind"] == "rnn"
        good = _rnn_folder(tmp_path) if rnn else _model_folder(tmp_path / "good")
        peaks = [_peak_rss_mb([sys.executable, "-m", "kiln", "info", str(f)])[1]
                 for f in (good, folder)]
        assert peaks[1] - peaks[0] < 100, peaks


def test_model_files_are_read_only_when_regular(tmp_path):
    """weights.safetensors linked to /dev/zero was read until memory ran out, a FIFO hung."""
    folder = _model_folder(tmp_path)
    weights = folder / "weights.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(storage.StorageError, match="not a regular file"):
        storage.load_model(str(folder))
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(storage.StorageError, match="not a regular file"):
        storage.load_model(str(folder))
    weights.unlink()
    with open(weights, "wb") as f:  # far past what its config allows (sparse: no disk)
        f.truncate(256 * 1024 * 1024)
    with pytest.raises(ModelFolderError, match="more than the"):
        storage.load_model(str(folder))


# ------------------------------------------------------------------ smaller losses


def test_class_names_with_dollars_make_a_report(tmp_path, pngs):
    """Two "$" in a class name crashed --report (matplotlib's math text) after the rows."""
    spec = CNNSpec("mnist_cnn", ["$5 bill$", "50%_off$", "a_b^c"])
    folder = tmp_path / "run"
    storage.save_model(str(folder / "model"), model_to_bytes(build_model("cnn", spec), "cnn",
                                                             spec))
    tar = embedded.write_flat_archive(tmp_path / "in.tar", pngs[:6], [f"{i}.png" for i in
                                                                       range(6)])
    summary = label(folder, [tar], tmp_path / "labels", report=True)
    assert summary["rows_labeled"] == 6 and (tmp_path / "labels" / "report.html").exists()


def test_a_truncated_tar_gz_keeps_its_whole_members(pngs, tmp_path):
    """The same truncated bytes named .tar.gz recovered 0 of the members that .tgz did:
    pyarrow unpacked the .gz on its own and lost what it had buffered."""
    from kiln.pipelines import sources

    got = {}
    for suffix in (".tgz", ".tar.gz"):
        path = tmp_path / f"cut{suffix}"
        embedded.write_flat_archive(path, pngs[:200], [f"{i:03d}.png" for i in range(200)])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 4])
        recs = [r for u in sources.plan([str(path)]) for r in sources.read_unit(u)]
        got[suffix] = sum(1 for r in recs if r.error is None)
    assert got[".tar.gz"] == got[".tgz"] > 100
