"""The end of a `kiln tune` search: a row per trial (OUT/trials.parquet), the best trial's model
exported as OUT/model/, each trial's metric over time (OUT/tune.png) and a table on the
terminal."""

from __future__ import annotations

import io
import json

from rich.console import Console
from rich.table import Table

from kiln.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from kiln.options import TrainOptions, TuneOptions
from kiln.pipelines import storage
from kiln.train.fit import TrainingError
from kiln.train.job import curves_png, read_metrics
from kiln.tune.space import flag, shown

STATUSES = ("finished", "stopped early", "failed", "not run")


def finish(opts: TuneOptions, base: TrainOptions, trials: dict, spaces: dict, results, fam,
           console: Console) -> dict:
    rows = trial_rows(trials, spaces, results, fam)
    ranked = sorted((r for r in rows if r["best"] is not None),
                    key=lambda r: tuple(fam.rank(r["best_record"])), reverse=True)
    if not ranked:
        errors = [f"{r['trial']}: {r['error']}" for r in rows if r["error"]]
        raise TrainingError("no trial finished a validation" +
                            (f"; {errors[0]}" if errors else ""))
    best = ranked[0]
    export_best(base.out, best, len(trials), spaces)
    storage.write_bytes(storage.join(base.out, "trials.parquet"), parquet_bytes(rows, spaces))
    histories = {tid: read_metrics(t.out) for tid, t in trials.items()}
    for tid, history in histories.items():  # a stopped trial's too (its actor was ended)
        if history:
            storage.write_bytes(storage.join(trials[tid].out, "curves.png"),
                                curves_png(history, fam.metric_key))
    storage.write_bytes(storage.join(base.out, "tune.png"),
                        tune_png(histories, fam.metric_key, best["trial"]))
    console.print(table(rows, spaces, fam, best["trial"]))
    given = " ".join(f"{flag(k)} {shown(best[k])}" for k in spaces)
    console.print(f"[bold green]done[/]: best trial {best['trial']} ({given}): "
                  f"{fam.summary_line(best['best_record'])} -> {base.out}/model",
                  highlight=False)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"best": best["trial"], "metrics": best["best_record"], "trials": rows,
            "counts": counts, "out": base.out}


def trial_rows(trials: dict, spaces: dict, results, fam) -> list[dict]:
    """One row per planned trial, from its run folder and Tune's record of it."""
    by_id = {}
    for r in results:
        by_id[(r.config or {}).get("trial")] = r
    rows = []
    for tid, t in trials.items():
        result = by_id.get(tid)
        history = read_metrics(t.out)
        try:
            best = storage.read_model_config(t.out).get("metrics")
        except storage.StorageError:
            best = None
        error = None
        if result is None or not history and result.error is None:
            # started (its run folder exists) but stopped before its first validation
            status = "stopped early" if result is not None and storage.exists(t.out) \
                else "not run"
        elif result.error is not None:
            status, error = "failed", one_line(result.error)
        elif reached_end(t, history):
            status = "finished"
        else:
            status = "stopped early"
        last = (result.metrics or {}) if result is not None else {}
        rows.append({"trial": tid, "status": status, **{k: getattr(t, k) for k in spaces},
                     "metric": fam.metric, "best": best[fam.metric] if best else None,
                     "best_epoch": float(best["epoch"]) if best else None,
                     "val_loss": best["val_loss"] if best else None,
                     "epochs": float(history[-1]["epoch"]) if history else 0.0,
                     "validations": len(history),
                     "elapsed_s": history[-1]["elapsed_s"] if history else 0.0,
                     "node": last.get("node"), "worker_pid": last.get("worker_pid"),
                     "error": error, "best_record": best})
    return rows


def reached_end(t: TrainOptions, history: list[dict]) -> bool:
    """Whether a run got to the end of its budget: its epochs, steps or time (a run cut short
    by the scheduler stops at one of its validations before that)."""
    last = history[-1]
    if t.epochs is not None and last["epoch"] >= t.epochs:
        return True
    if t.max_steps is not None and last["step"] >= t.max_steps:
        return True
    return t.time_limit is not None and last["elapsed_s"] >= 0.97 * t.time_limit * 60


def one_line(error) -> str:
    """A failed trial's error: the cause's last line, not Tune's wrapping."""
    text = [x for x in str(error).strip().splitlines() if x.strip()]
    return text[-1].strip() if text else type(error).__name__


def export_best(out: str, best: dict, n: int, spaces: dict) -> None:
    """The best trial's model as OUT/model/, its model card saying where it came from."""
    folder = storage.model_dir(storage.join(out, "trials", best["trial"]))
    config = json.loads(storage.read_bytes(storage.join(folder, CONFIG_FILE)))
    config["tune"] = {"trial": best["trial"], "trials": n, "spaces": spaces}
    weights = storage.read_bytes(storage.join(folder, WEIGHTS_FILE))
    storage.save_model(storage.join(out, "model"),
                       {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config, indent=2).encode()})


def parquet_bytes(rows: list[dict], spaces: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = [k for k in rows[0] if k != "best_record"]
    table = pa.Table.from_pylist([{k: r[k] for k in keep} for r in rows])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def tune_png(histories: dict, key: str, best: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tid, history in histories.items():
        if not history:
            continue
        ax.plot([r["elapsed_s"] for r in history], [r[key] for r in history], "o-",
                lw=2.5 if tid == best else 1, ms=3, label=tid + (" (best)" if tid == best else ""))
    ax.set(xlabel="training seconds", ylabel=key.replace("_", " "),
           title=f"{key.replace('_', ' ')} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def table(rows: list[dict], spaces: dict, fam, best: str) -> Table:
    out = Table(title="trials", title_justify="left")
    for name in ("trial", *(flag(k) for k in spaces), fam.metric, "epochs", "status"):
        out.add_column(name, justify="left" if name in ("trial", "status") else "right")
    for r in rows:
        metric = f"{r['best']:.4f}" if r["best"] is not None else "-"
        status = r["status"] + (f": {r['error'][:60]}" if r["error"] else "")
        out.add_row(r["trial"] + (" *" if r["trial"] == best else ""),
                    *(shown(r[k]) for k in spaces), metric, shown(r["epochs"]), status,
                    style="bold" if r["trial"] == best else None)
    return out
