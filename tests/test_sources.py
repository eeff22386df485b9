"""kiln.pipelines.sources: every input kind yields one record per member or file, bad ones with
their error kind, nothing extracted to disk. No Ray."""

from __future__ import annotations

import os
import tarfile
import time
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import embedded
from kiln.pipelines import listing, sources, storage
from kiln.pipelines.transforms import ImageError, ImagePreset, decode
from kiln.pipelines.units import unit_id
from tests import image_cases as ic

PRESET = ImagePreset()


@pytest.fixture(scope="module")
def goods(digits_data):
    pngs, _ = digits_data
    return {f"good/{i:03d}.png": pngs[i] for i in range(30)}


def read_all(uri, chunk: int = 1000, skip=frozenset()) -> list[sources.Record]:
    return [r for u in sources.plan([str(uri)], chunk) for r in sources.read_unit(u, skip)]


def outcome(records) -> dict[str, str | None]:
    """path -> error kind (None: decodes fine), failing on a path seen twice."""
    out: dict[str, str | None] = {}
    for r in records:
        assert r.path not in out, f"{r.path} yielded twice"
        kind = r.error.split(":")[0] if r.error else None
        if kind is None:
            try:
                decode(r.data, PRESET)
            except ImageError as e:
                kind = e.kind
        out[r.path] = kind
    return out


@pytest.fixture(autouse=True)
def no_extraction(monkeypatch):
    """Reading must never extract members onto disk."""
    def refuse(*a, **k):
        raise AssertionError("extracted to disk")

    for cls, names in ((tarfile.TarFile, ("extract", "extractall")),
                       (zipfile.ZipFile, ("extract", "extractall"))):
        for name in names:
            monkeypatch.setattr(cls, name, refuse)


@pytest.mark.parametrize("name", ["bad.tar", "bad.tar.gz", "bad.tgz"])
def test_tar_bad_members_one_row_each(tmp_path, goods, name):
    mode = "w" if name.endswith(".tar") else "w:gz"
    got = outcome(read_all(ic.bad_tar(tmp_path / name, goods, mode)))
    assert got == {**dict.fromkeys(goods), **ic.BAD_TAR_KINDS}  # and the directory: no row


def test_zip_bad_members_one_row_each(tmp_path, goods):
    got = outcome(read_all(ic.bad_zip(tmp_path / "bad.zip", goods)))
    assert got == {**dict.fromkeys(goods), **ic.BAD_ZIP_KINDS}


def test_directory_bad_entries(tmp_path, goods):
    root, kinds = ic.bad_dir(tmp_path / "d", goods)
    got = outcome(read_all(root))
    assert got == {**dict.fromkeys(goods), "bad/good_link.png": None, **kinds}


def test_truncated_tar_keeps_members_before_the_cut(tmp_path, goods):
    path, whole = ic.truncated_tar(tmp_path / "cut.tar", goods)
    got = outcome(read_all(path))
    assert got == {**dict.fromkeys(whole), list(goods)[-1]: "truncated"}


def test_corrupt_tar_header_keeps_members_before_it(tmp_path, goods):
    path, whole = ic.corrupt_header_tar(tmp_path / "hdr.tar", goods)
    got = outcome(read_all(path))
    assert {p: k for p, k in got.items() if k is None} == dict.fromkeys(whole)
    assert [k for k in got.values() if k] == ["corrupt"]


def test_truncated_gzip_stream_keeps_members_before_the_cut(tmp_path, goods):
    full = ic.bad_tar(tmp_path / "full.tgz", goods, "w:gz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(full[: len(full) // 2])
    got = outcome(read_all(tmp_path / "cut.tgz"))
    assert [k for k in got.values() if k == "truncated"][-1:] == ["truncated"]
    assert sum(k is None for k in got.values()) >= 5


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100])
def test_unopenable_archives_are_one_error_row(tmp_path, content):
    for name in ("x.tar", "x.zip", "x.parquet"):
        (tmp_path / name).write_bytes(content)
        recs = read_all(tmp_path / name)
        assert len(recs) == 1 and recs[0].error.startswith("unreadable: ")


def test_parquet_keys_and_null_images(tmp_path, digits_data):
    pngs, labels = digits_data
    with_path = embedded.write_image_parquet(tmp_path / "a.parquet", pngs[:1200], labels[:1200],
                                             ids=[f"img-{i}" for i in range(1200)])
    recs = read_all(with_path)
    assert [r.path for r in recs] == [f"img-{i}" for i in range(1200)]
    assert [r.label for r in recs] == labels[:1200]
    table = pa.table({"id": pa.array([7, 8, 9]), "image": pa.array([pngs[0], None, b"junk"])})
    pq.write_table(table, tmp_path / "b.parquet")
    assert outcome(read_all(tmp_path / "b.parquet")) == {"7": None, "8": "empty",
                                                         "9": "not_image"}
    pq.write_table(table.drop(["id"]), tmp_path / "c.parquet", row_group_size=2)
    assert [r.path for r in read_all(tmp_path / "c.parquet")] == ["row-0", "row-1", "row-2"]


def test_parquet_without_image_column_fails_fast(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "p.parquet")
    with pytest.raises(storage.StorageError, match="'image' column"):
        sources.plan([str(tmp_path / "p.parquet")])


def test_units_chunk_and_skip(tmp_path, digits_data):
    pngs, labels = digits_data
    tar = embedded.write_class_tar(tmp_path / "c.tar", pngs[:250], labels[:250])
    units = sources.plan([str(tar)], chunk=100)
    assert [len(u.items) for u in units] == [100, 100, 50]
    assert len({u.key for u in units}) == 3
    first = [r.path for r in sources.read_unit(units[0])]
    rest = [r.path for r in sources.read_unit(units[0], skip=frozenset(first[:60]))]
    assert rest == first[60:]
    recs = list(sources.read_unit(units[1], with_labels=True))
    assert [r.label for r in recs] == labels[100:200]


def test_a_directory_plans_its_folders_without_their_names(tmp_path, goods, monkeypatch):
    """A folder's files are units named by their first and last name, listed again by the
    task; a folder of more than FOLDER_NAMES_HELD files is held name by name; adding a file
    makes its folder's units others (their ids carry its mtime)."""
    root = tmp_path / "d"
    files = {f"a/{i:02d}.png": b for i, b in enumerate(list(goods.values())[:5])}
    files.update({f"b/c/{i}.png": b for i, b in enumerate(list(goods.values())[5:8])})
    files["top.png"] = goods["good/000.png"]
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    monkeypatch.setattr(listing, "FOLDER_NAMES_HELD", 4)  # so folder a/ is held by name
    units = sources.plan([str(root)], chunk=2)
    assert [(u.kind, u.items if u.kind == "folder" else len(u.items)) for u in units] == [
        ("folder", [".", "top.png", "top.png", 1]), ("folder", ["b/c", "0.png", "1.png", 2]),
        ("folder", ["b/c", "2.png", "2.png", 1]), ("files", 2), ("files", 2), ("files", 1)]
    assert [u.index for u in units] == list(range(6)) and sources.count_known(units) == 9
    assert outcome(read_all(root, chunk=2)) == dict.fromkeys(files)
    assert [r.path for r in sources.read_unit(units[1], skip=frozenset({"b/c/0.png"}))] == [
        "b/c/1.png"]
    got = list(listing.read_paths(units[1], ["b/c/1.png"]))  # one file, the folder not listed
    assert [(r.path, r.data) for r in got] == [("b/c/1.png", files["b/c/1.png"])]
    # An entry whose kind cannot be read (a link that loops) is a file, and an error row of
    # its own; a folder that can no longer be listed stops the job (its rows are not lost).
    (root / "b" / "c" / "0a.png").symlink_to(root / "b" / "c" / "0a.png")
    assert outcome(sources.read_unit(units[1])) == {"b/c/0.png": None, "b/c/1.png": None,
                                                    "b/c/0a.png": "not_a_file"}
    os.remove(root / "b" / "c" / "0a.png")
    os.rename(root / "b" / "c", root / "b" / "gone")
    with pytest.raises(storage.StorageError, match="cannot list the folder again"):
        list(sources.read_unit(units[1]))
    os.rename(root / "b" / "gone", root / "b" / "c")
    before = [unit_id(u) for u in units]
    time.sleep(0.01)
    (root / "b" / "c" / "9.png").write_bytes(goods["good/001.png"])
    after = [unit_id(u) for u in sources.plan([str(root)], chunk=2)]
    assert after[0] == before[0] and not set(after[1:3]) & set(before)


def test_globs_and_missing_inputs(tmp_path, digits_data):
    pngs, labels = digits_data
    for i in range(3):
        embedded.write_class_tar(tmp_path / f"part{i}.tar", pngs[:10], labels[:10])
    units = sources.plan([str(tmp_path / "part*.tar")])
    assert sorted({u.source for u in units}) == [str(tmp_path / f"part{i}.tar")
                                                 for i in range(3)]
    with pytest.raises(storage.StorageError, match="matches nothing"):
        sources.plan([str(tmp_path / "nothing*.tar")])
    with pytest.raises(storage.StorageError, match="not found"):
        sources.plan([str(tmp_path / "absent.tar")])


def test_s3_sources(s3_bucket, tmp_path, goods):
    """A tar on S3 is streamed; zip, Parquet and prefixes are read by range and by key."""
    tar = ic.bad_tar(tmp_path / "bad.tar", goods)
    storage.write_bytes(f"{s3_bucket}/in/bad.tar", tar.read_bytes())
    zp = ic.bad_zip(tmp_path / "bad.zip", goods)
    storage.write_bytes(f"{s3_bucket}/in/bad.zip", zp.read_bytes())
    for name, data in goods.items():
        storage.write_bytes(f"{s3_bucket}/dir/{name}", data)
    pq_path = embedded.write_image_parquet(tmp_path / "p.parquet", list(goods.values()))
    storage.write_bytes(f"{s3_bucket}/in/p.parquet", pq_path.read_bytes())
    assert outcome(read_all(f"{s3_bucket}/in/bad.tar")) == {**dict.fromkeys(goods),
                                                             **ic.BAD_TAR_KINDS}
    assert outcome(read_all(f"{s3_bucket}/in/bad.zip")) == {**dict.fromkeys(goods),
                                                             **ic.BAD_ZIP_KINDS}
    assert outcome(read_all(f"{s3_bucket}/dir")) == dict.fromkeys(goods)
    # A prefix is planned in runs of keys, without holding them; each run's task lists it
    # again; an object added changes the run it falls in alone.
    pages = sources.plan([f"{s3_bucket}/dir"], chunk=7)
    assert {(u.kind, tuple(u.items[4])) for u in pages} == {("s3page", ("good",))}
    assert len(pages) >= 2 and sources.count_known(pages) == len(goods)  # folder markers: none
    read = [[r.path for r in sources.read_unit(u)] for u in pages]
    assert [len(r) for r in read] == [u.items[3] for u in pages]
    assert sum(read, []) == sorted(goods)
    first = read[1]
    assert [r.path for r in sources.read_unit(pages[1], frozenset(first[:5]))] == first[5:]
    assert listing.slice_holds(pages[1], first[0]) and not listing.slice_holds(pages[0],
                                                                                first[0])
    storage.write_bytes(f"{s3_bucket}/dir/good/010a.png", goods["good/000.png"])
    again = sources.plan([f"{s3_bucket}/dir"], chunk=7)
    before, after = ({unit_id(u) for u in p} for p in (pages, again))
    assert len(before - after) == 1 and 1 <= len(after - before) <= 2
    assert [r.path for r in listing.read_paths(pages[0], read[0][:1])] == read[0][:1]
    assert len(read_all(f"{s3_bucket}/in/p.parquet")) == len(goods)
    assert len(sources.plan([f"{s3_bucket}/in/*.zip"])) == 1
