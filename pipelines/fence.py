"""Where kiln may write: an output is refused, before anything is read or written, where it is
"/", the home folder, the working directory or a folder above one of them, or where it holds,
equals or lies inside one of the job's inputs (its data, prompts, model, starting weights). An
output inside its input would be read as input by the next run; an output above it could hold
the input's files among its own."""

from __future__ import annotations

import fnmatch
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
    home = _real(os.path.expanduser("~"))
    cwd = _real(os.getcwd())
    if out == "/":
        raise FenceError(f"{flag} {output} is the root folder; kiln writes its output into a "
                         "folder of its own: name one, e.g. --output labels/")
    for place, what in ((home, "the home folder"), (cwd, "the working directory")):
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


def _check_local_input(output: str, out: str, given: str, flag: str) -> None:
    pattern = storage.GLOB_CHARS & set(given)
    matched = storage.expand(given) if pattern else [given]
    for uri in matched:
        src = _real(uri)
        if _within(out, src):
            where = "is" if out == src else "lies inside"
            raise FenceError(f"{flag} {output} {where} the input {storage.shown(uri)}: a "
                             "run would read its own output as input; choose an --output "
                             "outside it")
        if _within(src, out):
            raise FenceError(f"{flag} {output} holds the input {storage.shown(uri)}: kiln "
                             "keeps its output apart from its inputs; choose an --output "
                             "that does not contain them")
    if pattern:
        # A later run's glob must not match the output (or a folder above it) either.
        full = storage.local_path(given)
        depth = len(full.split("/"))
        probe = storage.local_path(output).split("/")
        if len(probe) >= depth and fnmatch.fnmatchcase("/".join(probe[:depth]), full):
            raise FenceError(f"{flag} {output} is matched by the input pattern {given}: a "
                             "later run would read the output as input; choose an --output "
                             "the pattern does not match")
        base = _real(_glob_base(full))
        if _within(base, out) and base != out:
            raise FenceError(f"{flag} {output} holds the inputs {given}; choose an --output "
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
            full, probe = _s3_path(given), out.split("/")
            depth = len(full.split("/"))
            if _within(_s3_path(_glob_base(given)), out) or (
                    len(probe) >= depth and fnmatch.fnmatchcase("/".join(probe[:depth]), full)):
                raise FenceError(f"{flag} {output} holds or is matched by the input pattern "
                                 f"{given}; choose an --output apart from the inputs")
            continue
        src = _s3_path(given)
        if _within(out, src) or _within(src, out):
            raise FenceError(f"{flag} {output} and the input {given} overlap (one holds the "
                             "other): kiln keeps its output apart from its inputs; choose "
                             "another --output")
    return output


def check_run_folder(out: str, inputs: Iterable[str | None], own: Iterable[str],
                     flag: str = "--out") -> str:
    """A training run's or a search's folder: check_output's rules, and a folder that exists
    holds only what such a run writes (`own`, the lease), so that a run never writes over
    files it did not write."""
    from .lease import LEASE_FILE

    out = check_output(out, inputs, flag)
    foreign = [n for n in storage.list_dir(out) if n not in {*own, LEASE_FILE}]
    if foreign:
        shown = ", ".join(storage.shown(n) for n in foreign[:3])
        more = ", ..." if len(foreign) > 3 else ""
        raise FenceError(f"{flag} {out} holds files that kiln did not write ({shown}{more}); "
                         "a run folder is new, empty or a kiln run of its own: choose "
                         f"another {flag}")
    return out
