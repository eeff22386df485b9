"""The `kiln` command line. Only this module reads flags; each command fills an options
dataclass and hands it to its job function."""

from __future__ import annotations

import json
import logging
import os
import sys

import typer
from rich.console import Console

from kiln import compat
from kiln.cluster import connect
from kiln.options import (
    ADDRESS_HELP,
    EvalOptions,
    GenerateOptions,
    LabelOptions,
    ReviewOptions,
    TrainOptions,
)

console = connect.console()
app = typer.Typer(
    name="kiln",
    help="Train CNNs and char-RNNs with Ray Train; bulk-label images and bulk-generate text "
    "with Ray Data. Every URI is a local path or s3://bucket/prefix.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train a model with Ray Train.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ADDRESS = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)
DEBUG = {"on": False}  # `kiln --debug`: tracebacks and Ray's own output on the console


@app.callback()
def main_options(debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks, and Ray's and its workers' output.")):
    DEBUG["on"] = debug


def fail(message: str, code: int = 2) -> None:
    from kiln.redact import redact

    console.print(f"[bold red]error:[/] {redact(message)}", highlight=False)
    raise typer.Exit(code)


def one_line(e: BaseException) -> str:
    """An unexpected exception as its type and the last line of its message (a Ray error's
    message ends with the remote exception's own line)."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"


def run_job(fn, *args):
    """Runs a job. A user's mistake (a ValueError and its kin: bad options, data, models,
    outputs, storage) is one line and exit code 2; anything else one line naming its type
    and exit code 1; --debug re-raises both with their tracebacks."""
    from kiln.pipelines.sink import OutputError
    from kiln.pipelines.storage import StorageError

    try:  # models.ModelFolderError is a ValueError (and importing models imports torch: slow)
        return fn(*args)
    except (StorageError, OutputError, FileNotFoundError, ValueError) as e:
        if DEBUG["on"]:
            raise
        # A Ray task's error is also its remote exception's type, its message a traceback.
        e = getattr(e, "cause", None) or e
        fail(str(e) if "\n" not in str(e).strip() else one_line(e))
    except KeyboardInterrupt as e:
        fail(str(e) or "interrupted; run the same command again to resume", code=130)
    except Exception as e:
        if DEBUG["on"]:
            raise
        fail(f"{one_line(e)} (kiln --debug ... shows the traceback)", code=1)


def option_params(cls, kind: str, *, text: set[str] = frozenset(), replaced: dict | None = None,
                  suffix: dict | None = None) -> list:
    """The command's parameters, one per option of the dataclass `cls` that the model family
    `kind` has (kiln.options.opt: its default, help and environment variable). Options in
    `text` are read as text (kiln tune's spaces); `replaced` holds Typer options of the
    command's own, `suffix` a help's last words."""
    import dataclasses
    import inspect
    import types
    import typing

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or meta["family"] not in (None, kind):
            continue
        help = meta["help"][kind] if isinstance(meta["help"], dict) else meta["help"]
        default = ... if f.default is dataclasses.MISSING else f.default
        annotation = hints[f.name]
        if isinstance(annotation, types.UnionType):  # `int | None` -> int
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        decls = ([meta["flag"]] if meta.get("flag") else
                 [f"--{f.name.replace('_', '-')}"] if annotation is bool else [])
        if f.name in text:
            annotation, default = str, None if default is None else str(default)
        option = (replaced or {}).get(f.name) or typer.Option(
            default, *decls, envvar=meta["envvar"],
            help=help + (suffix or {}).get(f.name, ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=annotation))
    return params


def with_params(fn, params: list, doc: str):
    """`fn(**options)` as a Typer command of these parameters."""
    import inspect

    fn.__signature__ = inspect.Signature(params)
    fn.__doc__ = doc
    return fn


def train_command(kind: str, doc: str):
    def command(**given):
        from kiln.train.job import run_train

        run_job(run_train, TrainOptions(kind, **given, debug=DEBUG["on"]))

    return with_params(command, option_params(TrainOptions, kind), doc)


train_app.command("cnn", epilog="Example: kiln train cnn --data digits.tar --out runs/digits")(
    train_command("cnn", "Train an image classifier."))
train_app.command("rnn", epilog="Example: kiln train rnn --data corpus.txt --out runs/chars "
                  "--max-steps 2000")(
    train_command("rnn", "Train a character-level language model (char-rnn)."))


# `kiln tune cnn|rnn` takes kiln train's options, the ones a search may vary (the family's
# `tunable`) read as text: a value or a space.
tune_app = typer.Typer(help="Search hyperparameters with Ray Tune: trials of kiln train.",
                       no_args_is_help=True)
app.add_typer(tune_app, name="tune")
SPACE_HELP = {str: " Searchable: a list a,b.",
              int: " Searchable: a list a,b,c or a range LOW:HIGH[:log].",
              float: " Searchable: a list a,b,c or a range LOW:HIGH[:log]."}
TUNE_OPTIONS = {
    "trials": (int, typer.Option(None, help="Trials; default: the whole grid of lists, or 8 "
                                 "with a range.")),
    "concurrent": (int, typer.Option(None, help="Trials at a time; default: what the "
                                     "cluster's CPUs (GPUs) hold at --workers per trial.")),
    "scheduler": (str, typer.Option("asha", help="asha (stops trials that fall behind at "
                                    "its rungs, on the validation metric) or fifo.")),
    "search_time_limit": (float, typer.Option(None, help="Minutes for the whole search.")),
}
TUNE_REPLACED = {
    "out": typer.Option(..., help="Search folder: trials/, model/ (the best trial's), "
                        "trials.parquet, tune.png."),
    "workers": typer.Option(1, help="Ray Train workers (DDP) per trial."),
    "resume": typer.Option(False, "--resume", help="Continue an interrupted search: finished "
                           "trials are not run again."),
}


def tune_command(kind: str):
    import inspect

    from kiln.train.families import family

    tunable = family(kind).tunable  # the options a search may vary, and their types

    def command(**kw):
        from kiln.options import TuneOptions
        from kiln.tune.job import run_tune

        spaces = {k: kw.pop(k) for k in tunable}
        extra = {k: kw.pop(k) for k in TUNE_OPTIONS}
        train = TrainOptions(kind, **kw, debug=DEBUG["on"])
        run_job(run_tune, TuneOptions(train, spaces, **extra))

    params = option_params(TrainOptions, kind, text=set(tunable), replaced=TUNE_REPLACED,
                           suffix={k: SPACE_HELP[t] for k, t in tunable.items()})
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t)
               for k, (t, o) in TUNE_OPTIONS.items()]
    return with_params(command, params, f"Search the hyperparameters of `kiln train {kind}`.")


tune_app.command("cnn", epilog="Example: kiln tune cnn --data digits.tar --out runs/search "
                 "--lr 1e-3:1e-1:log --batch-size 64,128 --epochs 8 --trials 8")(
    tune_command("cnn"))
tune_app.command("rnn", epilog="Example: kiln tune rnn --data corpus.txt --out runs/search "
                 "--lr 1e-3:1e-2:log --hidden 128,256 --time-limit 5")(
    tune_command("rnn"))


def job_command(cls, run: str, doc: str):
    """A command that fills the options dataclass `cls` and runs `run` (module:function,
    imported when the command runs) with it."""
    def command(**given):
        import importlib

        module, name = run.split(":")
        run_job(getattr(importlib.import_module(module), name),
                cls(**given, debug=DEBUG["on"]))

    return with_params(command, option_params(cls, None), doc)


app.command("label", epilog="Example: kiln label --model runs/digits --input 'photos/*.tar' "
            "--output labels/ --top-k 3 --report")(
    job_command(LabelOptions, "kiln.bulk.label:run_label",
                "Label every image of the inputs with a trained CNN."))
app.command("generate", epilog="Example: kiln generate --model runs/chars --num-samples 100 "
            "--output gen/ --temperature 0.8")(
    job_command(GenerateOptions, "kiln.bulk.generate:run_generate",
                "Generate text from prompts (or unconditionally) with a trained char-RNN."))
app.command("eval", epilog="Example: kiln eval --model runs/digits --data test.tar "
            "--output eval/")(
    job_command(EvalOptions, "kiln.bulk.eval:run_eval",
                "Measure a trained model on labeled images (accuracy, per-class F1, "
                "confusion, calibration) or on text (nats and bits per character)."))

app.command("review", epilog="Example: kiln review --labels labels/  (then open the address "
            "it prints); kiln review --labels labels/ --export final.parquet")(
    job_command(ReviewOptions, "kiln.review.server:run_review",
                "Review a label output in the browser, the least certain rows first; each "
                "decision is saved as it is made."))


@app.command(epilog="Example: kiln info runs/digits")
def info(
    uri: str = typer.Argument(..., help="A run folder or model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print config.json as it is."),
):
    """Print the model card of a trained model."""
    from kiln.pipelines.storage import load_model
    from kiln.reports.card import model_card

    loaded = run_job(load_model, uri)
    if as_json:
        print(json.dumps(loaded.config, indent=2))
    else:
        Console().print(model_card(loaded), highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Example: kiln submit --address http://127.0.0.1:8265 -- kiln label "
             "--model s3://b/run --input s3://b/imgs.tar --output s3://b/labels")
def submit(
    ctx: typer.Context,
    address: str = ADDRESS,
    gpus: float = typer.Option(0, help="GPUs the job's driver reserves."),
    cpus: float = typer.Option(1, help="CPUs the job's driver reserves."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once submitted."),
    forward_credentials: bool = typer.Option(
        False, "--forward-credentials", help="Give the job's processes this shell's AWS_* "
        "variables (in a package Ray uploads but never logs or shows); by default the "
        "cluster uses its own credentials."),
):
    """Run a kiln job on a Ray cluster through Ray Jobs (the args after --)."""
    from kiln.cluster.submit import submit as submit_job
    from kiln.options import SubmitOptions

    opts = SubmitOptions(list(ctx.args), address, gpus, cpus, not no_wait,
                         forward_credentials=forward_credentials)
    run_job(submit_job, opts)


@app.command()
def status(job_id: str, address: str = ADDRESS):
    """Show a submitted job's status."""
    from kiln.cluster.submit import status as job_status

    run_job(job_status, job_id, address)


@app.command()
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f"),
         address: str = ADDRESS):
    """Print a submitted job's logs."""
    from kiln.cluster.submit import logs as job_logs

    run_job(job_logs, job_id, address, follow)


@app.command()
def stop(job_id: str, address: str = ADDRESS):
    """Stop a submitted job."""
    from kiln.cluster.submit import stop as stop_job

    run_job(stop_job, job_id, address)


@app.command("list")
def list_jobs(address: str = ADDRESS):
    """List the jobs of a Ray cluster."""
    from kiln.cluster.submit import list_jobs as jobs_list

    run_job(jobs_list, address)


@app.command(epilog="Example: kiln demo --out demo-output")
def demo(
    out: str = typer.Option("demo-output", help="Where the demo writes everything."),
    small: bool = typer.Option(False, "--small", help="A faster, smaller run (for tests)."),
):
    """The whole flow on embedded data: build data sets, train, label, generate, report."""
    from kiln.demo import run_demo

    run_job(run_demo, out, small, DEBUG["on"])


def run_cli(args: list[str] | None = None) -> int:
    """The app, with a mistyped command line as one line too: Click's own answer is a usage
    line and a boxed message."""
    NoArgsIsHelpError, UsageError = compat.click_exceptions()  # noqa: N806

    try:
        code = app(args, standalone_mode=False)
    except NoArgsIsHelpError as e:  # `kiln`, `kiln train`: their help
        e.show()
        return 0
    except UsageError as e:
        where = e.ctx.command_path if e.ctx else "kiln"
        console.print(f"[bold red]error:[/] {e.format_message().rstrip('.')} (`{where} --help` "
                      "lists what it takes)", highlight=False)
        return 2
    except typer.Abort:
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    from kiln.cluster.connect import quiet_ray_data_logs

    quiet_ray_data_logs()
    try:
        code = run_cli()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        # The work is done, every output closed and any Ray shut down; tearing down torch's
        # (and Ray's) native modules at interpreter exit takes more time that nobody waits
        # on gladly.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
