"""`kiln demo`: the whole flow on embedded data, in one local Ray session.

1. builds real data: scikit-learn's digits as PNGs in a class-per-folder tar (training) and a
   flat tar of held-out digits with a few broken files (labeling); the standard library's own
   source as a text corpus, and a file of prompts;
2. trains the CNN and a char-RNN with Ray Train on 2 workers;
3. labels the archive and generates text with Ray Data;
4. writes demo-output/report.html and prints where everything is."""

from __future__ import annotations

import time
from pathlib import Path

from rich.rule import Rule

from kiln import embedded
from kiln.cluster import connect
from kiln.cluster.connect import RayOptions, ray_session
from kiln.options import GenerateOptions, LabelOptions, TrainOptions

console = connect.console(highlight=False)
PROMPTS = ["def ", "class ", "import ", "    return ", "# ", "if __name__ == ", "for i in ",
           "    def __init__(self", "raise ValueError(", "with open(", "    \"\"\"", "try:\n    ",
           "self.", "elif ", "from . import ", "while True:\n", "print(", "lambda x: ",
           "assert ", "yield ", "except Exception as e:\n", "@property\n", "async def ", ""]
BROKEN = {"broken/truncated.png": "truncate", "broken/empty.png": "empty",
          "broken/notes.txt": "text", "broken/garbage.png": "garbage"}


def build_data(out: Path, small: bool) -> dict:
    """Writes the demo's inputs under out/data and returns their paths and the truth."""
    data = out / "data"
    pngs, labels = embedded.digits(28)
    train, held = embedded.split(len(pngs), 0.15, seed=0)
    train_tar = embedded.write_class_tar(data / "digits-train.tar", [pngs[i] for i in train],
                                         [labels[i] for i in train])
    names = [f"unlabeled/{n:05d}.png" for n in range(len(held))]
    good = [pngs[i] for i in held]
    broken = {"truncate": good[0][: len(good[0]) // 2], "empty": b"",
              "text": b"not an image, just notes\n", "garbage": bytes(range(256)) * 4}
    label_tar = embedded.write_flat_archive(
        data / "digits-unlabeled.tar", good + [broken[k] for k in BROKEN.values()],
        names + list(BROKEN))
    corpus = data / "stdlib.txt"
    corpus.write_text(embedded.stdlib_corpus(200_000 if small else 600_000), encoding="utf-8")
    prompts = data / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n")
    truth = {name: labels[i] for name, i in zip(names, held, strict=True)}
    return {"train_tar": train_tar, "label_tar": label_tar, "corpus": corpus,
            "prompts": prompts, "truth": truth, "n_train": len(train)}


def step(n: int, title: str) -> float:
    console.print(Rule(f"[bold]{n}/5 {title}", align="left"))
    return time.monotonic()


def run_demo(out: str = "demo-output", small: bool = False, debug: bool = False) -> dict:
    from kiln.bulk.generate import run_generate
    from kiln.bulk.label import run_label
    from kiln.pipelines.fence import check_run_folder, mark_run_folder
    from kiln.reports.demo import write_report
    from kiln.train.job import run_train

    root = Path(check_run_folder(out, [], "demo"))
    root.mkdir(parents=True, exist_ok=True)
    mark_run_folder(str(root), "demo")
    start, times = time.monotonic(), {}
    t = step(1, "building the data sets from scikit-learn's digits and the stdlib source")
    data = build_data(root, small)
    console.print(f"  {data['n_train']:,} training digits, {len(data['truth']):,} to label "
                  f"(+{len(BROKEN)} broken files), {data['corpus'].stat().st_size:,} bytes "
                  f"of Python, {len(PROMPTS)} prompts")
    times["data"] = time.monotonic() - t
    runs = root / "runs"
    with ray_session(RayOptions(include_dashboard=True, log_to_driver=debug)):
        t = step(2, "training the digit CNN with Ray Train (2 workers)")
        run_train(TrainOptions("cnn", str(data["train_tar"]), str(runs / "digits"),
                               epochs=3 if small else 8, batch_size=64, resume=False))
        times["train_cnn"] = time.monotonic() - t
        t = step(3, "training the char-RNN on Python source (2 workers)")
        rnn = (dict(max_steps=40, hidden=64, seq_len=64) if small
               else dict(time_limit=1.25, hidden=256))
        run_train(TrainOptions("rnn", str(data["corpus"]), str(runs / "chars"), **rnn))
        times["train_rnn"] = time.monotonic() - t
        t = step(4, "labeling the archive with Ray Data")
        labels = run_label(LabelOptions(str(runs / "digits"), [str(data["label_tar"])],
                                        str(root / "labels"), top_k=3, overwrite=True))
        times["label"] = time.monotonic() - t
        t = step(5, "generating Python-ish text with Ray Data")
        gen = run_generate(GenerateOptions(str(runs / "chars"), str(root / "generated"),
                                           prompts=str(data["prompts"]),
                                           max_chars=120 if small else 300, temperature=0.8,
                                           seed=1, overwrite=True))
        times["generate"] = time.monotonic() - t
    report = write_report(root, data, labels, gen)
    times["total"] = time.monotonic() - start
    print_summary(root, report, times)
    return {"report": str(report["path"]), "times": times, **report}


def print_summary(root: Path, report: dict, times: dict) -> None:
    console.print(Rule("[bold green]done", align="left"))
    console.print(f"  held-out digit accuracy  {report['accuracy']:.1%} "
                  f"({report['labeled']:,} labeled, {report['errors']} broken files reported)")
    console.print(f"  char-RNN validation      {report['bits_per_char']:.2f} bits/char")
    console.print(f"  generated                {report['generated']:,} continuations")
    console.print("  time                     " + ", ".join(
        f"{k} {v:.0f}s" for k, v in times.items()))
    console.print(f"\n  open [bold]{report['path']}[/]")
    console.print(f"  runs: {root / 'runs'}   labels: {root / 'labels'}   "
                  f"text: {root / 'generated'}")
    console.print("  try:  kiln info " + str(root / "runs" / "digits"))
