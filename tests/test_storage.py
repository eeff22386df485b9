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


def test_a_killed_commands_credentials_file_is_removed_by_the_next(tmp_path, monkeypatch):
    """secrets_in_a_file's private file outlives a command killed with SIGKILL; the next
    command that writes one removes it, and leaves a live command's file and others' files."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from kiln.pipelines import s3

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-for-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-for-test")
    code = ("import sys, time\nfrom kiln.pipelines import s3\n"
            "with s3.secrets_in_a_file():\n    print('in', flush=True)\n    time.sleep(600)\n")
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline() == "in\n" and live.stdout.readline() == "in\n"
        files = {p.name.split("-")[2]: p for p in tmp_path.glob("kiln-aws-*.ini")}
        assert set(files) == {str(killed.pid), str(live.pid)}
        assert b"secret-for-test" in files[str(killed.pid)].read_bytes()
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        other = tmp_path / "kiln-aws-notes.ini"  # not a name kiln gives
        other.write_text("mine")
        with s3.secrets_in_a_file():
            assert "secret-for-test" not in os.environ.values()
            assert not files[str(killed.pid)].exists()
            assert files[str(live.pid)].exists() and other.exists()
        assert sorted(p.name for p in tmp_path.glob("kiln-aws-*.ini")) == [
            files[str(live.pid)].name, other.name]
    finally:
        for p in (killed, live):
            p.kill()
            p.wait()
