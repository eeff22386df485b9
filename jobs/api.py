"""kiln's Python API: the commands as functions, for notebooks and scripts.

    from kiln import api
    run = api.train("cnn", data="digits.tar", out="runs/digits", epochs=5)
    labels = api.label(model=run.out, inputs=["incoming/*.tar"], output="labels/")

Each function takes the command's options as keyword arguments (the fields of its options
dataclass in kiln.options, under the same names: `batch_size` for --batch-size), checks them as
the command does before anything starts, and raises the command's errors (ValueError and its
kin for a mistake) rather than exiting. On a Ray that the caller started (ray.init in a
notebook), the jobs run there; without one, as the commands do. Each returns a result object."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields

from kiln.options import (
    EvalOptions,
    GenerateOptions,
    LabelOptions,
    ReviewOptions,
    TrainOptions,
    TuneOptions,
)


@dataclass(frozen=True)
class Run:
    """A training run: its folder, its best validation's metrics, its validations."""

    out: str
    best: dict
    epochs: int


@dataclass(frozen=True)
class Output:
    """A job's output folder (or a search's folder) and the summary it wrote."""

    output: str
    summary: dict


def _options(cls, given: dict, **fixed):
    known = {f.name for f in fields(cls)} - {"debug"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; {cls.__name__} has "
                        f"{', '.join(sorted(known - set(fixed)))}")
    return cls(**fixed, **given)


def train(kind: str, data: str, out: str, **options) -> Run:
    """`kiln train cnn|rnn`: trains a model; returns the run (its folder, best metrics)."""
    from kiln.train.job import run_train

    result = run_train(_options(TrainOptions, options, kind=kind, data=data, out=out))
    return Run(result["out"], result["best"], result["epochs"])


def tune(kind: str, data: str, out: str, space: dict[str, str], trials: int | None = None,
         concurrent: int | None = None, scheduler: str = "asha",
         search_time_limit: float | None = None, **options) -> Output:
    """`kiln tune cnn|rnn`: `space` maps an option to its search text as the command takes it
    ({"lr": "1e-4:1e-2:log", "batch_size": "64,128"}); `options` are the training options
    every trial shares. Returns the search folder and its summary."""
    from kiln.train.families import family
    from kiln.tune.job import run_tune

    train_opts = _options(TrainOptions, options, kind=kind, data=data, out=out)
    tunable = family(kind).tunable
    odd = sorted(set(space) - set(tunable))
    if odd:
        raise ValueError(f"{', '.join(odd)} cannot be searched; a {kind} search varies "
                         f"{', '.join(sorted(tunable))}")
    # As the command takes them: text, a list "64,128" or a range "1e-4:1e-2:log".
    texts = {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
             for k, v in space.items()}
    summary = run_tune(TuneOptions(train_opts, texts, trials, concurrent, scheduler,
                                   search_time_limit))
    return Output(train_opts.out, summary)


def label(model: str, inputs: list[str] | str, output: str, **options) -> Output:
    """`kiln label`: labels every image of the inputs; returns the output and its summary."""
    from kiln.bulk.label import run_label

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    summary = run_label(_options(LabelOptions, options, model=model, inputs=inputs,
                                 output=output))
    return Output(output, summary)


def generate(model: str, output: str, **options) -> Output:
    """`kiln generate`: text from prompts (`prompts=`) or unconditionally (`num_samples=`)."""
    from kiln.bulk.generate import run_generate

    summary = run_generate(_options(GenerateOptions, options, model=model, output=output))
    return Output(output, summary)


def evaluate(model: str, data: str, output: str, **options) -> Output:
    """`kiln eval`: measures a model on labeled data; the figures are in OUTPUT/eval.json."""
    from kiln.bulk.eval import run_eval

    summary = run_eval(_options(EvalOptions, options, model=model, data=data, output=output))
    return Output(output, summary)


def info(model: str) -> dict:
    """`kiln info`: a model's card as its config.json holds it (no weights are loaded)."""
    from kiln.pipelines import storage

    return storage.read_model_config(model)


def export_review(labels: str, file: str) -> int:
    """`kiln review --export`: writes a label output's final labels; returns the rows."""
    from kiln.review.server import run_review

    return run_review(ReviewOptions(labels=labels, export=file))["rows"]


def _signature(fn, cls, first: tuple[str, ...]) -> None:
    """The function's signature with the options dataclass's fields as keyword arguments, so
    that help() and a notebook's completion show every option with its default."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in params}
    for f in fields(cls):
        if f.name in taken or f.name in first or f.name == "debug":
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else inspect.Parameter.empty)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=f.type))
    fn.__signature__ = sig.replace(parameters=params)


for _fn, _cls, _first in ((train, TrainOptions, ("kind", "data", "out")),
                          (tune, TrainOptions, ("kind", "data", "out")),
                          (label, LabelOptions, ("model", "inputs", "output")),
                          (generate, GenerateOptions, ("model", "output")),
                          (evaluate, EvalOptions, ("model", "data", "output"))):
    _signature(_fn, _cls, _first)

eval = evaluate  # noqa: A001  (the command's name; `evaluate` where `eval` is the builtin)
