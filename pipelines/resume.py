"""What a label job has left to do: the units an output holds whole, the keys of the rows it
holds of the others (pipelines.sink.Written's footers, then the keys of unfinished units'
parts alone), and one task per unit that still has work."""

from __future__ import annotations

import bisect

from . import names
from .bulk import pack
from .listing import slice_holds
from .sink import Written
from .sources import unit_paths
from .units import Unit, unit_id


def make_tasks(units: list[Unit], done: set[tuple[str, str]],
               whole: set[str] | frozenset = frozenset()) -> list[dict]:
    """One task per unit that still has work: the unit and the paths of it that are already
    written (`skip`). `whole`: the ids of units every row of which is written (their last
    part is), skipped without their keys; `done`: the (source, path) of the other rows
    written."""
    by_source: dict[str, set[str]] = {}
    for source, path in done:
        by_source.setdefault(names.parse(source)[0], set()).add(path)
    by_folder: dict[tuple[str, str], list[str]] = {}  # a folder unit's candidates: its folder's
    by_key: dict[str, tuple[list[str], list[str]]] = {}  # an S3 page's: (keys, paths), sorted
    if any(u.kind == "folder" for u in units):
        for source, paths in by_source.items():
            for path in paths:
                folder = names.parse(path)[0].rpartition("/")[0] or "."
                by_folder.setdefault((source, folder), []).append(path)
    tasks = []
    for unit in units:
        if whole and unit_id(unit) in whole:
            continue
        done_here = by_source.get(unit.source, set())
        paths = unit_paths(unit)
        if paths is not None:
            skip = frozenset(p for p in paths if p in done_here)
            if len(skip) == len(paths) and paths:
                continue  # the whole unit is written already
        elif unit.kind == "folder":  # its task, even where all seem written: it lists again
            skip = frozenset(p for p in by_folder.get((unit.source, unit.items[0]), ())
                             if slice_holds(unit, p))
        elif unit.kind == "s3page":
            if unit.source not in by_key:
                pairs = sorted((unit.items[0] + names.parse(p)[0], p) for p in done_here)
                by_key[unit.source] = ([k for k, _ in pairs], [p for _, p in pairs])
            keys, written = by_key[unit.source]
            after, last = unit.items[1:3]
            skip = frozenset(written[bisect.bisect_right(keys, after):
                                     bisect.bisect_right(keys, last)])
        else:
            skip = frozenset(done_here)
        tasks.append(pack((unit, skip)))
    return tasks


def resume_plan(written: Written, units: list[Unit]
                ) -> tuple[set[str], set[tuple[str, str]], set[tuple]]:
    """What an output holds of these units: the ids of the units whose last part is written
    (skipped whole, their parts not read), the (source, path) of the rows of the other
    parts, and every row of an earlier kiln's parts (no footer record) as (source, path,
    label, error), each part read once."""
    whole = written.whole_units() & {unit_id(u) for u in units}
    legacy = written.read_keys(written.legacy(), ["source", "path", "label", "error"])
    done = written.read_keys(written.unfinished(whole), ["source", "path"])
    done.update((s, p) for s, p, _, _ in legacy)
    return whole, done, legacy
