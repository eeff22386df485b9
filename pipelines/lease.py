"""One writer per output: a job holds its output folder's lease, OUTPUT/_kiln_lease.json, from
before it reads which rows are done until its summary is written. A second job on the same
output is refused with one line naming the holder; a killed job's lease passes to its rerun.

- On a local (or network) disk the lease is an exclusive flock on that file, which the kernel
  drops when the holding process dies however it dies: a rerun after a kill takes it at once.
  The file's text (who holds it) is for the message alone.
- On S3 there are no locks: the lease is the object itself, created with a conditional write
  (If-None-Match: *), renewed every RENEW_S seconds by the holder (If-Match its last ETag) and
  taken over only where its holder is known dead: a process of this machine that no longer
  runs (same boot, pid and start time), or a lease that nobody renewed for TTL_S seconds, by
  the store's own clock (its Date against the object's Last-Modified). A holder that finds
  its lease taken stops at its next part (Lease.check)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from datetime import datetime

from . import s3, storage

LEASE_FILE = "_kiln_lease.json"
RENEW_S, TTL_S = 15.0, 60.0


class LeaseError(storage.StorageError):
    """The output is held by another job (or was taken from this one)."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells it from a later process
    of the same pid; None where it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace: two containers on one host (host network) share a
    hostname and a boot, but not their pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _runs_here(holder: dict) -> bool | None:
    """Whether the holder's process runs: True or False where it was on this machine, since
    its last boot and in this pid namespace; None where that cannot be told from here."""
    ns = _pid_namespace()
    if (holder.get("host") != socket.gethostname() or holder.get("boot") != _boot_id()
            or not ns or holder.get("pidns") != ns):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    now = _start_time(pid)
    return now is not None and (now == "" or now == holder.get("pid_start"))


def describe(holder: dict) -> str:
    if not holder:
        return "another kiln job"
    return (f"another kiln job ({holder.get('job', '?')}, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')})")


class Lease:
    """The lease of one output folder. acquire() creates the folder (and the lease file);
    release() gives the lease up (the file stays: deleting it under a waiting job would let
    two hold it)."""

    def __init__(self, folder: str, job: str, run_id: str):
        self.folder, self.job, self.run_id = folder, job, run_id
        self.uri = storage.join(folder, LEASE_FILE)
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._writing = threading.Lock()  # one renewal at a time: the beat's or confirm()'s
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost (S3), else None
        self.taken_from: dict | None = None  # the dead holder this run took over from

    def record(self) -> dict:
        pid = os.getpid()
        return {"job": self.job, "run": self.run_id, "host": socket.gethostname(),
                "pid": pid, "pid_start": _start_time(pid), "boot": _boot_id(),
                "pidns": _pid_namespace(),
                "started": datetime.now().astimezone().isoformat(timespec="seconds")}

    def acquire(self) -> Lease:
        if storage.is_s3(self.folder):
            self._acquire_s3()
            self._thread = threading.Thread(target=self._renew, name="kiln-lease", daemon=True)
            self._thread.start()
        else:
            self._acquire_local()
        return self

    def busy(self, holder: dict, extra: str = "") -> LeaseError:
        return LeaseError(f"{storage.shown(self.folder)} is being written by {describe(holder)}"
                          f"{extra}; one job writes an output at a time: wait for it to end, "
                          "stop it, or choose another --output")

    # --- a local disk ---------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        path = storage.local_path(self.uri)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # O_NOFOLLOW: a link planted under the lease's name is not followed (the lease is
            # written to: it would overwrite whatever the link names).
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise storage.StorageError(f"{storage.shown(self.folder)}: cannot write there: "
                                       f"{e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise storage.StorageError(f"{storage.shown(self.uri)} is not a file kiln wrote; "
                                       "choose another --output")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 65536, 0))
            os.close(fd)
            raise self.busy(holder) from None
        except OSError as e:
            os.close(fd)
            raise storage.StorageError(
                f"{storage.shown(self.folder)}: this filesystem cannot lock files ({e.strerror}),"
                " so kiln cannot make sure it is the only job writing there; choose an output "
                "on a local disk or on S3") from None
        before = _parse(os.pread(fd, 65536, 0))
        if before.get("run"):
            self.taken_from = before
        data = json.dumps(self.record(), indent=1).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd

    # --- S3 -------------------------------------------------------------------------------

    def _acquire_s3(self) -> None:
        client = s3.s3_client()
        bucket, key = s3.s3_bucket_key(self.uri)
        body = json.dumps(self.record(), indent=1).encode()
        for _ in range(5):
            held = _get(client, bucket, key)
            try:
                if held is None:
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                   IfNoneMatch="*")["ETag"]
                else:
                    holder, etag, age = held
                    alive = _runs_here(holder)
                    if alive or (alive is None and age < TTL_S):
                        lapse = "" if alive else (f", last renewed {age:.0f} s ago; if that job "
                                                  f"was killed, its lease lapses in "
                                                  f"{TTL_S - age:.0f} s")
                        raise self.busy(holder, lapse)
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                   IfMatch=etag)["ETag"]
                    self.taken_from = holder
            except LeaseError:
                raise
            except Exception as e:
                if not _conflict(e):
                    raise storage.StorageError(f"{self.uri}: {e}") from None
                continue  # another job moved first: look again
            mine = _get(client, bucket, key)  # a store that ignores conditions: read it back
            if mine is not None and mine[0].get("run") == self.run_id:
                return
        held = _get(client, bucket, key)
        raise self.busy(held[0] if held else {})

    def _renew(self) -> None:
        client = s3.s3_client()
        bucket, key = s3.s3_bucket_key(self.uri)
        body = json.dumps(self.record(), indent=1).encode()
        while not self._stop.wait(RENEW_S):
            try:
                self._renew_once(client, bucket, key, body)
            except LeaseError:
                return
            except Exception:
                continue  # the store is unreachable for now: try again at the next beat

    def _renew_once(self, client, bucket: str, key: str, body: bytes) -> None:
        with self._writing:
            if self.lost:
                raise LeaseError(self.lost)
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                               IfMatch=self._etag)["ETag"]
            except Exception as e:
                if not _conflict(e):
                    raise
                held = _get(client, bucket, key)
                self.lost = (f"{self.folder}: {describe(held[0] if held else {})} took this "
                             "output over (this job's lease was not renewed in time); this "
                             "job stops: run it again once that one ends")
                raise LeaseError(self.lost) from None

    def confirm(self) -> None:
        """Renews the lease now, or raises: before a step that deletes or finishes (a late
        part's removal, the summary), so that it is taken only by the lease's holder. On a
        local disk the lock is held for as long as the process lives."""
        self.check()
        if self._etag is None or self._fd is not None:
            return
        bucket, key = s3.s3_bucket_key(self.uri)
        body = json.dumps(self.record(), indent=1).encode()
        try:
            self._renew_once(s3.s3_client(), bucket, key, body)
        except LeaseError:
            raise
        except Exception as e:
            raise storage.StorageError(f"{self.uri}: cannot renew this job's lease ({e}); "
                                       "run the same command again to finish") from None

    # --- both -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raises where another job took the output over (S3)."""
        if self.lost:
            raise LeaseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        elif self._etag is not None and not self.lost:
            # Marks the lease free for a rerun anywhere: renewed long ago.
            with contextlib.suppress(Exception):
                client = s3.s3_client()
                bucket, key = s3.s3_bucket_key(self.uri)
                client.put_object(Bucket=bucket, Key=key, IfMatch=self._etag,
                                  Body=json.dumps({"run": None, "released": True}).encode())
            self._etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict:
    try:
        held = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return held if isinstance(held, dict) else {}


def _conflict(e: Exception) -> bool:
    """Whether a write failed because another writer's condition won."""
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _get(client, bucket: str, key: str) -> tuple[dict, str, float] | None:
    """(holder, ETag, seconds since its last write by the store's clock), or None."""
    from botocore.exceptions import ClientError

    try:
        got = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise storage.StorageError(f"s3://{bucket}/{key}: {e}") from None
    holder = _parse(got["Body"].read())
    now = got["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    age = 0.0
    if now:
        from email.utils import parsedate_to_datetime

        age = (parsedate_to_datetime(now) - got["LastModified"]).total_seconds()
    if holder.get("released"):
        age = float("inf")
    return holder, got["ETag"], age
