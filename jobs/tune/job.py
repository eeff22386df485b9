"""`kiln tune cnn|rnn`: a hyperparameter search on Ray Tune, each trial a normal kiln training
run. The plan of trials (jobs/tune/space.py) is fixed up front and kept in OUT/tune.json;
every trial's options are checked before Ray starts. The data is prepared once for all trials
that agree on what it depends on, and handed to them through the object store. A trial is a
Tune function that builds the run's TorchTrainer (jobs/train/fit.py) with Ray Train's
TuneReportCallback, which forwards rank 0's validation records to Tune: ASHA stops the trials
that fall behind at its rungs. Afterwards the best trial's model is exported as OUT/model/,
so that label, generate and info take OUT as they take a run folder.

Search folder:
    OUT/tune.json      the plan: options, spaces, each trial's values
    OUT/tune/          Ray Tune's experiment state (--resume restores it)
    OUT/trials/<id>/   each trial's run folder: model/, metrics.jsonl, curves.png, checkpoints
    OUT/model/         the best trial's model
    OUT/trials.parquet, OUT/tune.png   one row per trial; its metric over time
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, replace

from ray import tune
from rich.console import Console

from kiln import compat
from kiln.cluster import connect
from kiln.cluster.connect import RayOptions, ray_session
from kiln.cluster.placement import Placement, local_gpus, place
from kiln.options import TrainOptions, TuneOptions, one_of
from kiln.pipelines import storage
from kiln.pipelines.fence import check_run_folder, mark_run_folder
from kiln.pipelines.lease import Lease
from kiln.train.families import family
from kiln.train.fit import epoch_line, make_trainer, worker_error
from kiln.train.job import resolve, validate
from kiln.tune.space import flag, parse_spaces, plan_trials, shown, trial_ids

SEARCH_STATE = "tune"  # Ray Tune's experiment folder under OUT
PLAN_FILE = "tune.json"
SCHEDULERS = ("asha", "fifo")
RESERVE_CPUS = 0.25  # left to Ray Data's tasks beside every trial's workers
ASHA_REDUCTION = 4  # Ray's default: a quarter of the trials at a rung go on to the next
TRIAL_DRIVER_CPUS = 0.01


@dataclass
class Layout:
    """How trials share the cluster: `concurrent` at a time, each worker reserving
    `per_worker` CPUs, each trial's workers `cpus` CPUs of torch threads in all."""

    concurrent: int
    per_worker: float
    cpus: float


@dataclass
class Setup:
    """What every trial is handed (through the object store, once)."""

    trials: dict  # id -> TrainOptions, resolved
    prepared: dict  # the family's data_key -> its data (kiln.train.family.Prepared)
    layout: Layout


def run_tune(opts: TuneOptions, console: Console | None = None) -> dict:

    console = CONSOLE["now"] = console or connect.console(highlight=False)
    t = opts.train
    out = check_run_folder(t.out, [t.data, t.val, t.init], "tune", legacy=[PLAN_FILE])
    where = place(t)  # the search's placement, its trials' too
    base, trials, spaces = plan(replace(opts, train=replace(t, out=out)), where)
    return _tune(opts, base, trials, spaces, where, console)


def _tune(opts: TuneOptions, base: TrainOptions, trials: dict, spaces: dict, where: Placement,
          console: Console) -> dict:
    from kiln.tune.results import finish

    out = base.out
    one_of("--scheduler", opts.scheduler, SCHEDULERS)
    if opts.search_time_limit is not None and opts.search_time_limit <= 0:
        raise ValueError("--search-time-limit must be a positive number of minutes")
    storage.check_reachable(base.data, must_exist=True)
    if base.val:
        storage.check_reachable(base.val, must_exist=True)
    storage.check_reachable(out)
    state = plan_state(opts, base, spaces, trials)
    check_resume(out, state, base.resume)
    fam = family(base.kind)
    if not where.cluster:  # the fit is checked before Ray starts, on this machine's count
        layout(opts, trials, where.cpus, local_gpus() if base.gpu else 0, check_fit=True)
    groups = data_groups(trials, fam)
    early = {key: fam.check_data(rep) for key, rep in groups.items()}
    # The lease: one search writes a search folder at a time.
    with Lease(out, "tune", uuid.uuid4().hex[:8]), \
            ray_session(RayOptions(address=base.address, log_to_driver=base.debug,
                                   forward_credentials=base.forward_credentials)):
        import ray

        mark_run_folder(out, "tune")

        res = ray.cluster_resources()
        lay = layout(opts, trials, res.get("CPU", 1), res.get("GPU", 0))
        t0 = time.monotonic()
        prepared = prepare(trials, fam, groups, early)
        console.print(f"data ready in {time.monotonic() - t0:.1f}s: "
                      f"{next(iter(prepared.values())).summary}")
        console.print(f"{len(trials)} trials, {lay.concurrent} at a time, {base.workers} "
                      f"worker{'s' if base.workers > 1 else ''} each; scheduler "
                      f"{opts.scheduler}", highlight=False)
        if not base.resume:
            storage.write_bytes(storage.join(out, PLAN_FILE), json.dumps(state, indent=2)
                                .encode())
        try:
            results = search(opts, Setup(trials, prepared, lay), fam)
        except KeyboardInterrupt:
            results = None
        if results is None or interrupted(results, opts):  # Tune returns from a Ctrl-C
            raise KeyboardInterrupt(f"interrupted; run the same command with --resume to "
                                    f"continue the search in {out}")
    return finish(opts, base, trials, spaces, results, fam, console)


def interrupted(results, opts: TuneOptions) -> bool:
    """Whether Tune returned with trials still to run: one of them running, or any waiting
    when no --search-time-limit (which leaves the trials it did not reach waiting) ended it."""
    trials = getattr(results, "_experiment_analysis", None)
    if trials is None:  # another Ray: the public counts alone
        return results.num_terminated + results.num_errors < len(results) and \
            not opts.search_time_limit
    waiting = {t.status for t in trials.trials} - {"TERMINATED", "ERROR"}
    return bool(waiting - {"PENDING"}) or bool(waiting and not opts.search_time_limit)


def plan(opts: TuneOptions, where: Placement) -> tuple[TrainOptions, dict, dict]:
    """(the shared options, each trial's resolved options by id, the spaces as typed), every
    trial's options checked as kiln train checks them."""
    kind = opts.train.kind
    fixed, spaces = parse_spaces(kind, opts.spaces)
    t = opts.train
    base = replace(t, **fixed, out=storage.absolute(t.out), data=storage.absolute(t.data),
                   val=storage.absolute(t.val) if t.val else None,
                   init=storage.absolute(t.init) if t.init else None)
    values = plan_trials(spaces, opts.trials, base.seed)
    trials = {}
    for tid, v in zip(trial_ids(len(values)), values, strict=True):
        topts = resolve(replace(base, **v, out=storage.join(base.out, "trials", tid),
                                resume=False))
        try:
            validate(topts, where)
        except ValueError as e:
            given = " ".join(f"{flag(k)} {shown(x)}" for k, x in v.items())
            raise ValueError(f"trial {tid} ({given}): {e}") from None
        trials[tid] = topts
    return base, trials, {k: opts.spaces[k] for k in spaces}


def plan_state(opts: TuneOptions, base: TrainOptions, spaces: dict, trials: dict) -> dict:
    """What makes a search the same search: --resume must find it unchanged (Tuner.restore
    keeps the scheduler, concurrency and time budget it was started with)."""
    shared = {k: v for k, v in asdict(base).items()
              if k not in ("out", "resume", "address", "debug", "forward_credentials")
              and k not in spaces}
    shared.update(scheduler=opts.scheduler, concurrent=opts.concurrent,
                  search_time_limit=opts.search_time_limit)
    return {"kind": base.kind, "options": shared, "spaces": spaces,
            "trials": {tid: {k: getattr(t, k) for k in spaces} for tid, t in trials.items()}}


def check_resume(out: str, state: dict, resume: bool) -> None:
    started = storage.exists(storage.join(out, PLAN_FILE))
    if started and not resume:
        raise ValueError(f"{out} already holds a search; pass --resume to continue it, or "
                         "choose another --out")
    if resume and not started:
        raise ValueError(f"{out} holds no search to resume (no {PLAN_FILE}); run it without "
                         "--resume")
    if resume:
        before = json.loads(storage.read_bytes(storage.join(out, PLAN_FILE)))
        for key in ("kind", "options", "spaces", "trials"):
            if before.get(key) != state[key]:
                raise ValueError(f"{out} was searched with other {key} ({before.get(key)}); "
                                 "resume it with the same options, or choose another --out")


def layout(opts: TuneOptions, trials: dict, cpus: float, gpus: float,
           check_fit: bool = False) -> Layout:
    """--concurrent (default: a whole CPU, or a GPU, per worker of each trial at once), and
    each worker's share of the CPUs, a quarter of one left to Ray Data. With `check_fit`
    (this machine's count, before Ray starts) a search whose trials cannot fit fails here,
    not by waiting for resources forever; on a running Ray the trials beyond it queue."""
    w = opts.train.workers
    if opts.train.gpu:
        fits = int(gpus // w)
        k = opts.concurrent or max(1, fits)
        per_worker = 1.0
    else:
        fits = int((cpus - RESERVE_CPUS) // (0.5 * w))  # half a CPU a worker at the least
        k = opts.concurrent or max(1, int(cpus // w))
        per_worker = max(0.5, min(1.0, (cpus - RESERVE_CPUS) / (min(k, len(trials)) * w)))
    if opts.concurrent is not None and opts.concurrent < 1:
        raise ValueError(f"--concurrent must be at least 1, got {opts.concurrent}")
    k = min(k, len(trials))
    if k > max(fits, 0) and check_fit:
        what = f"{gpus:g} GPUs" if opts.train.gpu else f"{cpus:g} CPUs"
        raise ValueError(f"--concurrent {k} trials of --workers {w} do not fit this machine's "
                         f"{what}: lower --concurrent or --workers, or point --address at a "
                         "Ray cluster")
    return Layout(k, per_worker, cpus / k)


def data_groups(trials: dict, fam) -> dict:
    """The trials by the data they need (the family's data_key): each group's data is checked
    before Ray starts, with its largest batch, and prepared once."""
    groups: dict = {}
    for t in trials.values():
        groups.setdefault(fam.data_key(t), []).append(t)
    return {key: max(group, key=lambda t: t.batch_size) for key, group in groups.items()}


def prepare(trials: dict, fam, groups: dict, early: dict) -> dict:
    prepared = {key: fam.prepare(rep, early[key]) for key, rep in groups.items()}
    for key, rep in groups.items():  # --init read here, once: trials may run on other nodes
        if rep.init:
            from kiln.train.init import read_init

            prepared[key] = replace(prepared[key], init_source=read_init(rep.init))
    for tid, t in trials.items():  # every trial's steps checked before the search starts
        try:
            fam.for_options(t, prepared[fam.data_key(t)])
        except ValueError as e:
            raise ValueError(f"trial {tid}: {e}") from None
    return prepared


def run_trial(config: dict, setup: Setup) -> None:
    """One trial, in its Tune actor: its kiln training run under a TorchTrainer that reports
    to Tune. A trial resumed by Tuner.restore continues from its run's last checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    opts = setup.trials[config["trial"]]
    fam = family(opts.kind)
    data = fam.for_options(opts, setup.prepared[fam.data_key(opts)])
    trainer = make_trainer(opts, data, setup.layout.cpus, setup.layout.per_worker,
                           callbacks=[TuneReportCallback()])
    try:
        result = trainer.fit()
    except Exception as e:
        raise worker_error(e) from None
    if result.error:
        raise worker_error(result.error) from None


def search(opts: TuneOptions, setup: Setup, fam):
    """Runs (or restores) the Tuner; returns its ResultGrid."""
    base = opts.train
    fs, path = storage.filesystem(base.out)
    # A trial only drives its TorchTrainer (Tune refuses an empty request).
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"CPU": TRIAL_DRIVER_CPUS})
    exp = storage.join(base.out, SEARCH_STATE)
    run_config = tune.RunConfig(name=SEARCH_STATE, storage_path=path, storage_filesystem=fs,
                                verbose=0, callbacks=[TrialLines(fam)])
    if base.resume and storage.exists(storage.join(exp, "tuner.pkl")):
        try:
            tuner = tune.Tuner.restore(storage.filesystem(exp)[1], trainable,
                                       resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        except ModuleNotFoundError as e:  # Tune's state pickles kiln's callback by module
            if not (e.name or "").startswith("jobs"):
                raise
            raise ValueError(f"{base.out} holds a search of an older kiln (its modules were "
                             "named jobs.*): it cannot be resumed; start the search again "
                             "with another --out") from None
    else:
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(list(setup.trials))},
                           tune_config=tune_config(opts, setup, fam), run_config=run_config)
    with sweeping_placement_groups():
        if base.debug:
            return tuner.fit()
        # Tune prints its experiment's settings and where its files are, the raylet its
        # worker counts, to stdout: the console log takes them, the trial lines the terminal.
        with open(connect.console_log(), "a") as log, contextlib.redirect_stdout(log):
            return tuner.fit()


@contextlib.contextmanager
def sweeping_placement_groups(every_s: float = 1.0):
    """Frees the workers' CPUs of a trial Tune has stopped. Tune ends a stopped trial's actor,
    and with it the Ray Train controller that actor owns and the controller's workers; but a
    placement group lives as long as the job that made it, not the actor, so the workers'
    reservation would stay. Ray Train's own cleaner asks the dashboard's state API, which a
    local Ray may run without, or cannot tell apart from another Ray on the same machine
    (measured: the next trials waited for CPUs forever). So this job's placement groups whose
    creating actor is dead are removed here, from the GCS's own table, every second."""
    import threading

    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(every_s):
            try:
                for pg in actor_placement_groups()[0]:
                    ray.util.remove_placement_group(pg)
            except Exception:  # an internal API of Ray: its own cleaner remains
                return

    import ray

    thread = threading.Thread(target=sweep, name="kiln-pg-sweeper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        # Tune ends the last trials' actors as it returns: their groups are orphaned after.
        deadline = time.monotonic() + 15
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                orphaned, live = actor_placement_groups()
                for pg in orphaned:
                    ray.util.remove_placement_group(pg)
                if not live:
                    break
                time.sleep(0.5)


def actor_placement_groups() -> tuple[list, int]:
    """This job's live placement groups made by an actor (Ray Train's controllers): those
    whose actor has died, and how many are live in all."""
    import ray
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    records, live = compat.placement_groups()
    found, count = [], 0
    for info in records:
        made_by_actor = not ray.ActorID(info.creator_actor_id).is_nil()  # not the driver
        if (made_by_actor and not info.is_detached and info.state in live
                and info.creator_job_id.hex() == job):
            count += 1
            if info.creator_actor_dead:
                found.append(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
    return found, count


def tune_config(opts: TuneOptions, setup: Setup, fam):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if opts.scheduler == "asha":
        # A rung is a validation: every epoch, or a milestone of a --time-limit run.
        # max_t beyond the last validation: a trial that reaches its end finishes on its own
        # (ASHA would stop it at max_t, in the middle of Ray Train's shutdown).
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=max_validations(setup) + 1, grace_period=1,
                                  reduction_factor=ASHA_REDUCTION)
    else:
        scheduler = FIFOScheduler()
    name = lambda trial: trial.config["trial"]  # noqa: E731
    return tune.TuneConfig(
        metric=fam.metric, mode=fam.mode, scheduler=scheduler,
        max_concurrent_trials=setup.layout.concurrent,
        time_budget_s=opts.search_time_limit * 60 if opts.search_time_limit else None,
        trial_name_creator=name, trial_dirname_creator=name)


def max_validations(setup: Setup) -> int:
    from kiln.train.schedule import MAX_EVALS

    longest = 1
    for t in setup.trials.values():
        if t.epochs is not None:
            longest = max(longest, t.epochs)
        elif t.time_limit is not None and t.max_steps is None:  # validation by milestones
            longest = max(longest, MAX_EVALS)
        else:  # an epoch's validations until --max-steps: beyond any rung that is reached
            return 10**6
    return longest


class TrialLines(tune.Callback):
    """Tune's callback, run in this process: a line as each trial starts, validates, fails.
    Tune keeps it in its experiment state (a restored search gets it back from there), so
    it holds the family and finds the console here."""

    def __init__(self, fam):
        self.fam = fam

    def line(self, trial, text: str) -> None:
        (CONSOLE["now"] or connect.console()).print(f"{trial.config['trial']}  {text}",
                                                    highlight=False)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.line(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self.line(trial, epoch_line(result, self.fam))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self.line(trial, f"ended at epoch {last['epoch']}" if "epoch" in last else "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.line(trial, "[red]failed[/]")


CONSOLE: dict = {"now": None}  # the running search's console, for TrialLines
