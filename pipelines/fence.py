"""Where kiln may write: an output is refused, before anything is read or written, where it is
"/", the home folder, the working directory or a folder above one of them, or where it holds,
equals or lies inside one of the job's inputs (its data, prompts, model, starting weights). An
output inside its input would be read as input by the next run; an output above it could hold
the input's files among its own."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable

from . import names, storage


class FenceError(ValueError):
    """An output kiln must not write."""


def _real(uri: str) -> str:
    """A local path with its links resolved (those parts of it that exist)."""
    return os.path.realpath(storage.local_path(uri))


def _s3_path(uri: str) -> str:
    return str(uri)[len("s3://"):].strip("/")


def _within(inner: str, outer: str) -> bool:
    """Whether path `inner` is `outer` or lies below it ("/"-separated)."""
    return inner == outer or outer in ("", "/") or inner.startswith(outer.rstrip("/") + "/")


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    n = next((i for i, p in enumerate(parts) if storage.GLOB_CHARS & set(p)), len(parts))
    return "/".join(parts[:n]) or "/"


def check_output(output: str, inputs: Iterable[str | None], flag: str = "--output") -> str:
    """The output as kiln will write it (local: absolute), or FenceError naming why not."""
    output = str(output or "")
    if not output.strip():
        raise FenceError(f"{flag} is empty: name a folder for the output")
    if storage.is_s3(output):
        return _check_s3(output.rstrip("/"), [i for i in inputs if i], flag)
    if not names.is_text(output):
        raise FenceError(f"{flag} {storage.shown(output)}: the output's name must be UTF-8 "
                         "text; choose another name")
    out = _real(output)
    cwd = _real(os.getcwd())
    if out == "/":
        raise FenceError(f"{flag} {output} is the root folder; kiln writes its output into a "
                         "folder of its own: name one, e.g. --output labels/")
    for place, what in [*((h, "the home folder") for h in _homes()),
                        (cwd, "the working directory")]:
        if _within(place, out):
            which = what if place == out else f"a folder above {what} ({place})"
            raise FenceError(f"{flag} {output} is {which}; kiln writes its output into a "
                             "folder of its own: name a new one inside it, e.g. "
                             f"{os.path.join(output, 'out')}")
    for given in inputs:
        if not given or storage.is_s3(given):
            continue
        _check_local_input(output, out, str(given), flag)
    return storage.local_path(output)


def _homes() -> list[str]:
    """The home folder as $HOME says and as the user database says (HOME may be unset,
    empty or elsewhere)."""
    homes = []
    if os.environ.get("HOME"):
        homes.append(_real(os.environ["HOME"]))
    try:
        import pwd

        homes.append(_real(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError):
        pass
    return [h for h in dict.fromkeys(homes) if h != "/"]


def _check_local_input(output: str, out: str, given: str, flag: str) -> None:
    pattern = storage.GLOB_CHARS & set(given)
    matched = storage.expand(given) if pattern else [given]
    for uri in matched:
        src = _real(uri)
        if _within(out, src):
            where = "is" if out == src else "lies inside"
            raise FenceError(f"{flag} {output} {where} the input {storage.shown(uri)}: a "
                             f"run would read its own output as input; choose another "
                             f"{flag} outside it")
        if _within(src, out):
            raise FenceError(f"{flag} {output} holds the input {storage.shown(uri)}: kiln "
                             f"keeps its output apart from its inputs; choose another "
                             f"{flag} that does not contain them")
    if pattern:
        _check_pattern(output, out, storage.local_path(given), given, _real, flag)


def _check_pattern(output: str, out: str, full: str, given: str, real, flag: str) -> None:
    """An output at or below a glob's literal folder is refused where the pattern could match
    it, a folder above it or anything in it (a later run would read kiln's own files as
    input); an output above the literal folder holds the inputs."""
    literal = _glob_base(full)
    base = real(literal)
    segments = full[len(literal):].strip("/").split("/")
    if _within(out, base):
        below = [] if out == base else out[len(base):].strip("/").split("/")
        if all(fnmatch.fnmatchcase(o, p) for o, p in zip(below, segments, strict=False)):
            raise FenceError(f"{flag} {output} is matched by the input pattern {given}, or "
                             "holds what it matches: a later run would read the output as "
                             f"input; choose another {flag} the pattern does not reach")
    elif _within(base, out):
        raise FenceError(f"{flag} {output} holds the inputs {given}; choose another {flag} "
                         "that does not contain them")


def _check_s3(output: str, inputs: list[str], flag: str) -> str:
    out = _s3_path(output)
    if not out:
        raise FenceError(f"{flag} {output}: name a bucket and a folder in it, "
                         "e.g. s3://bucket/labels")
    for given in inputs:
        if not storage.is_s3(given):
            continue
        if storage.GLOB_CHARS & set(given):
            _check_pattern(output, out, _s3_path(given), given, lambda p: p.strip("/"), flag)
            continue
        src = _s3_path(given)
        if _within(out, src) or _within(src, out):
            raise FenceError(f"{flag} {output} and the input {given} overlap (one holds the "
                             f"other): kiln keeps its output apart from its inputs; choose "
                             f"another {flag}")
    return output


RUN_MARKER = "_kiln_run.json"  # what kind of kiln folder a run folder is (train, tune, demo)


def check_run_folder(out: str, inputs: Iterable[str | None], kind: str,
                     legacy: Iterable[str] = (), flag: str = "--out") -> str:
    """A training run's, a search's or the demo's folder: check_output's rules, and a folder
    that exists is empty or marked as a kiln folder of this kind by RUN_MARKER (or holds
    `legacy`: what a kind's folder held before kiln wrote the marker), so that a run never
    writes over files it did not write."""
    from .lease import LEASE_FILE

    out = check_output(out, inputs, flag)
    held = [n for n in storage.list_dir(out) if n != LEASE_FILE]
    if not held or any(n in held for n in legacy) and RUN_MARKER not in held:
        return out
    if RUN_MARKER in held:
        try:
            marked = json.loads(storage.read_bytes(storage.join(out, RUN_MARKER), 1 << 20))
            marked = marked.get("kind") if isinstance(marked, dict) else None
        except (storage.StorageError, ValueError):
            marked = None
        if marked == kind:
            return out
        what = f"a kiln {marked} folder" if isinstance(marked, str) else "an unreadable marker"
        raise FenceError(f"{flag} {out} holds {what}, not a {kind} one: choose another {flag}")
    shown = ", ".join(storage.shown(n) for n in held[:3])
    more = ", ..." if len(held) > 3 else ""
    raise FenceError(f"{flag} {out} holds files that kiln did not write ({shown}{more}); a "
                     f"{kind} folder is new, empty or one of its own: choose another {flag}")


def mark_run_folder(out: str, kind: str) -> None:
    """Marks a folder as a kiln folder of this kind (check_run_folder), once it holds its
    lease."""
    storage.write_bytes(storage.join(out, RUN_MARKER), json.dumps({"kind": kind}).encode())
