"""Storage URIs on local disk and on a real S3 endpoint (moto server)."""

import pytest

from kiln.pipelines import storage


def test_local_write_read_glob(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "x.bin"), b"123")
    storage.write_bytes(str(tmp_path / "b" / "y.bin"), b"45")
    assert storage.read_bytes(str(tmp_path / "a" / "x.bin")) == b"123"
    assert storage.expand(str(tmp_path / "*" / "*.bin")) == [
        str(tmp_path / "a" / "x.bin"), str(tmp_path / "b" / "y.bin")]
    assert [p.path.rsplit("/", 1)[1] for p in storage.list_files(str(tmp_path))] == [
        "x.bin", "y.bin"]
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_s3_write_read_glob(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/d/one.txt", b"1")
    storage.write_bytes(f"{s3_bucket}/d/two.txt", b"2")
    assert storage.read_bytes(f"{s3_bucket}/d/two.txt") == b"2"
    assert storage.expand(f"{s3_bucket}/d/*.txt") == [f"{s3_bucket}/d/one.txt",
                                                      f"{s3_bucket}/d/two.txt"]
    assert storage.is_dir(f"{s3_bucket}/d")


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_reachable("s3://no-such-bucket-here/x")


def test_dead_endpoint_is_a_clear_error(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.check_reachable("s3://bucket/x")
