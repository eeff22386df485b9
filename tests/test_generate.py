"""kiln generate: prompt reading and its bad inputs, and the job on a local Ray with a char-RNN
trained here: columns, reproducibility across batch sizes and actor counts, resume after a
kill, and clear errors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kiln import embedded
from kiln.bulk.generate import run_generate
from kiln.models import (
    CharRNN,
    CharVocab,
    CNNSpec,
    ModelFolderError,
    RNNSpec,
    SamplingSettings,
    build_model,
    model_to_bytes,
    row_seed,
    sample,
)
from kiln.options import GenerateOptions
from kiln.pipelines import generate as gen
from kiln.pipelines import storage
from kiln.pipelines.bulk import can_fork
from kiln.pipelines.sink import OutputDir, OutputError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["id", "prompt", "text", "seed", "temperature", "top_k", "max_chars",
           "unknown_chars", "model"]


@pytest.fixture(scope="module")
def rnn_model(tmp_path_factory):
    """A small char-LSTM trained for 200 steps on the standard library's source: a count of
    steps, not of seconds, so that a slower or busier machine trains the same model."""
    torch.manual_seed(0)
    text = embedded.stdlib_corpus(100_000)
    vocab = CharVocab.build(text)
    spec = RNNSpec(vocab.chars, "lstm", embed=32, hidden=128, layers=2)
    model = CharRNN(len(vocab), "lstm", 32, 128, 2)
    data = torch.tensor(vocab.encode(text))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(200):
        starts = torch.randint(0, len(data) - 65, (32,))
        batch = torch.stack([data[s : s + 65] for s in starts])  # (32, 65)
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("rnn") / "run" / "model"
    storage.save_model(str(folder), model_to_bytes(model.eval(), "rnn", spec))
    return folder.parent


def opts(model, output, **kw) -> GenerateOptions:
    kw.setdefault("max_chars", 40)
    return GenerateOptions(model=str(model), output=str(output), **kw)


def rows(output) -> dict:
    table = OutputDir(str(output), {}).read_table()
    return {r["id"]: r for r in table.to_pylist()}


# --- prompt inputs (no Ray) ----------------------------------------------------------------

def test_text_prompts_ids_are_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffone\r\n\nthree ☃\n".encode())
    t = gen.read_prompts(str(f))
    assert t.column("id").to_pylist() == [1, 2, 3]
    assert t.column("prompt").to_pylist() == ["one", "", "three ☃"]


def test_non_utf8_prompt_file_names_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"fine\nalso fine\nbad \xe9t\xe9\nfine\n")
    with pytest.raises(gen.PromptError, match=r"line 3 is not valid UTF-8.*column 5"):
        gen.read_prompts(str(f))


def test_parquet_prompts_with_and_without_ids(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", None], "id": ["x", "y"]}), tmp_path / "a.parquet")
    t = gen.read_prompts(str(tmp_path / "a.parquet"))
    assert t.column("id").to_pylist() == ["x", "y"]
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "b.parquet")
    assert gen.read_prompts(str(tmp_path / "b.parquet")).column("id").to_pylist() == [0, 1]
    pq.write_table(pa.table({"prompt": ["a", "b"], "id": [7, 7]}), tmp_path / "c.parquet")
    with pytest.raises(gen.PromptError, match="repeats 7"):
        gen.read_prompts(str(tmp_path / "c.parquet"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(gen.PromptError, match="no `prompt` column"):
        gen.read_prompts(str(tmp_path / "d.parquet"))


def test_prompts_from_s3(s3_bucket):
    boto3.client("s3").put_object(Bucket=s3_bucket[5:], Key="in/p.txt", Body=b"a\nb\n")
    t = gen.read_prompts(f"{s3_bucket}/in/p.txt")
    assert t.column("prompt").to_pylist() == ["a", "b"]


def test_prompt_policy_counts():
    vocab = CharVocab("abc \n")
    stats, unknown = gen.prompt_stats(["ab", "", None, "a☃☃", "x" * 30], vocab, 10)
    assert (stats.empty, stats.truncated, stats.with_unknown) == (2, 1, 2)
    assert stats.unknown_chars == 2 + 10 and unknown == [0, 0, 0, 2, 10]
    # A whole table's counts, a few prompts at a time, are the same.
    table = pa.table({"prompt": pa.array(["ab", "", None, "a☃☃", "x" * 30] * 3, pa.string())})
    assert gen.table_prompt_stats(table, vocab, 10, rows=4) == gen.prompt_stats(
        table.column("prompt").to_pylist(), vocab, 10)[0]


def test_wrong_kind_model_is_a_clear_error(tmp_path):
    spec = CNNSpec("mnist_cnn", ["a", "b"])
    storage.save_model(str(tmp_path / "cnn"),
                       model_to_bytes(build_model("cnn", spec), "cnn", spec))
    with pytest.raises(ModelFolderError, match="holds a CNN model.*needs a RNN model"):
        run_generate(opts(tmp_path / "cnn", tmp_path / "out", num_samples=3))


def test_cli_bad_prompt_file_is_one_line(tmp_path, rnn_model):
    f = tmp_path / "p.txt"
    f.write_bytes(b"ok\n\xff\xfe\n")
    res = subprocess.run([sys.executable, "-m", "kiln", "generate", "--model", str(rnn_model),
                          "--prompts", str(f), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2
    err = " ".join(res.stderr.split())  # Rich wraps long lines
    assert "line 2 is not valid UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_reaches_every_row_and_is_part_of_the_run(rnn_model, prompt_file, tmp_path,
                                                           precision):
    """--precision fp32 (or bf16, where this CPU has the kernels) gives each row the text
    models.sample gives at that precision; a run is not resumed at another precision, and
    an unknown one is a clear error before anything runs."""
    from kiln.models.stepper import bf16_linear

    if precision == "bf16" and not bf16_linear():
        pytest.skip("this CPU has no bf16 matrix kernels")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        run_generate(opts(rnn_model, tmp_path / "bad", prompts=str(prompt_file),
                          precision="fp16"))
    out = tmp_path / "gen"
    run_generate(opts(rnn_model, out, prompts=str(prompt_file), precision=precision))
    loaded = storage.load_model(str(rnn_model))
    got = rows(out)
    ids = sorted(got)
    want = sample(loaded.model, loaded.vocab, [got[i]["prompt"] or "" for i in ids],
                  [row_seed(0, i) for i in ids],
                  SamplingSettings(max_chars=40, precision=precision))
    assert [got[i]["text"] for i in ids] == want
    other = "bf16" if precision == "fp32" else "fp32"
    with pytest.raises(OutputError, match="precision"):
        run_generate(opts(rnn_model, out, prompts=str(prompt_file), precision=other))


def test_the_gates_measured_or_set_are_the_jobs_and_part_of_the_run(rnn_model, prompt_file,
                                                                     tmp_path, monkeypatch):
    """The kernels the driver chose (measured here, or set by KILN_GATES) are every row's:
    the texts are models.sample's in that form, summary.json says which, and a resume in the
    other form, whose rounding differs, is refused."""
    from kiln.models import kernels

    monkeypatch.setattr(kernels, "_MEMO", {})
    out = tmp_path / "gen"
    first = run_generate(opts(rnn_model, out, prompts=str(prompt_file), precision="fp32"))
    chosen = first["kernels"]
    assert chosen["products"] == "fp32" and chosen["gates"] in kernels.GATES
    assert chosen["how"] in ("measured", "cached")
    loaded = storage.load_model(str(rnn_model))
    got = rows(out)
    ids = sorted(got)
    prompts, seeds = [got[i]["prompt"] or "" for i in ids], [row_seed(0, i) for i in ids]
    texts = sample(loaded.model, loaded.vocab, prompts, seeds,
                   SamplingSettings(max_chars=40, precision="fp32", gates=chosen["gates"]))
    assert texts == [got[i]["text"] for i in ids]
    # The two forms round differently: a step's logits are not the same bits.
    from kiln.models.stepper import Stepper

    x = torch.arange(8) % len(loaded.vocab)
    steps = [Stepper(loaded.model, tanh_gates=t)(x, Stepper(loaded.model).init_state(8))[0]
             for t in (False, True)]
    assert torch.allclose(*steps, atol=1e-4) and not torch.equal(*steps)
    other = next(g for g in kernels.GATES if g != chosen["gates"])
    # Resumed where the measurement would now choose the other form (a cache cleared, a
    # near tie): the output's own form is kept, and nothing is redone.
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(kernels, "_MEMO", {})
    monkeypatch.setattr(kernels, "step_seconds", lambda m, g, p, n: 1.0 if g == other else 2.0)
    resumed = run_generate(opts(rnn_model, out, prompts=str(prompt_file), precision="fp32"))
    assert resumed["kernels"]["gates"] == chosen["gates"] and resumed["rows_written"] == 0
    assert resumed["kernels"]["how"] == "resumed"
    monkeypatch.setenv(kernels.GATES_ENV, other)  # asked for: another job
    with pytest.raises(OutputError, match="gates"):
        run_generate(opts(rnn_model, out, prompts=str(prompt_file), precision="fp32"))
    again = run_generate(opts(rnn_model, tmp_path / "set", prompts=str(prompt_file),
                              precision="fp32"))
    assert again["kernels"]["gates"] == other and again["kernels"]["how"] == "set"


def test_bf16_products_keep_the_models_bits_per_char(rnn_model):
    """On text the model did not see, stepping it with bfloat16 products predicts as well as
    with float32 ones (the state and the head stay float32)."""
    import math

    from kiln.models.stepper import Stepper, bf16_linear

    if not bf16_linear():
        pytest.skip("this CPU has no bf16 matrix kernels")
    loaded = storage.load_model(str(rnn_model))
    held_out = embedded.stdlib_corpus(200_000)[100_000:]  # the fixture trained on the first
    x = torch.tensor(loaded.vocab.encode(held_out)[: 64 * 201]).view(64, 201)

    def bits_per_char(stepper: Stepper) -> float:
        state, nll = stepper.init_state(64), 0.0
        for t in range(200):
            logits, state = stepper(x[:, t], state)
            nll -= torch.log_softmax(logits.double(), 1).gather(1, x[:, t + 1, None]).sum()
        return float(nll) / x[:, 1:].numel() / math.log(2)

    fp32 = bits_per_char(Stepper(loaded.model, bf16=False))
    bf16 = bits_per_char(Stepper(loaded.model, bf16=True))
    assert fp32 < 5.0  # a trained model, whose predictions bf16 could spoil
    assert abs(bf16 - fp32) < 0.005 * fp32


def test_generate_from_and_to_s3_without_ray(rnn_model, s3_bucket):
    """The whole command with no Ray: prompts read from S3, blocks sampled in processes
    forked after the S3 client started, every part written to S3 by the command itself."""
    body = "\n".join(f"def f{i}(x):" for i in range(30)) + "\n"
    boto3.client("s3").put_object(Bucket=s3_bucket[5:], Key="in/p.txt", Body=body.encode())
    out = f"{s3_bucket}/gen"
    cmd = [sys.executable, "-m", "kiln", "generate", "--model", str(rnn_model), "--prompts",
           f"{s3_bucket}/in/p.txt", "--output", out, "--max-chars", "30"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "without Ray" in res.stderr or not can_fork()
    got = rows(out)
    assert sorted(got) == list(range(1, 31)) and all(len(r["text"]) == 30 for r in got.values())
    loaded = storage.load_model(str(rnn_model))
    want = sample(loaded.model, loaded.vocab, [got[i]["prompt"] for i in range(1, 31)],
                  [row_seed(0, i) for i in range(1, 31)], SamplingSettings(max_chars=30))
    assert [got[i]["text"] for i in range(1, 31)] == want


def test_a_big_machine_keeps_jobs_here_by_the_precisions_rate(rnn_model, prompt_file,
                                                              monkeypatch):
    """On a machine of 16 CPUs a job stays out of Ray up to ~15 s of its cores' work, at the
    rate of the precision it samples in: bf16 products step about twice the characters."""
    import ray

    from kiln.bulk.generate import BF16_SPEEDUP, CHARS_PER_CPU_S, GenerateJob, sampling_of
    from kiln.cluster import placement
    from kiln.models import kernels

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(placement, "local_cpus", lambda: 16)
    loaded = storage.load_model(str(rnn_model))
    limit = placement.HERE_MAX_SECONDS * CHARS_PER_CPU_S * 16
    for products, rate in (("fp32", 1.0), ("bf16", BF16_SPEEDUP)):
        # --precision auto takes what the measurement chose
        monkeypatch.setattr(kernels, "choose", lambda *a, p=products, **k: kernels.Kernels(
            "sigmoid", p))
        o = opts(rnn_model, "unused", prompts=str(prompt_file))
        job = GenerateJob(o, loaded, SamplingSettings())
        assert job.s.precision == products and job.identity()["precision"] == products
        assert job.rate_per_cpu == CHARS_PER_CPU_S * rate
        assert job.where.runs_here(limit * rate, job.rate_per_cpu)
        assert not job.where.runs_here(limit * rate * 1.01, job.rate_per_cpu)
    assert sampling_of(opts(rnn_model, "unused", prompts=str(prompt_file))).precision == "auto"


def test_a_cluster_job_takes_one_form_on_every_worker(rnn_model, prompt_file, monkeypatch,
                                                     tmp_path):
    """On a cluster named by an address the workers' CPUs are not this process's to time:
    every worker takes the first form (sigmoid gates, fp32 products) unless KILN_GATES or
    --precision set it. (A Ray started on this machine steps on its CPUs: measured, as the
    texts of test_texts_do_not_depend_on_batch_size_or_actors show.)"""
    from kiln.bulk.generate import GenerateJob
    from kiln.cluster.placement import Placement
    from kiln.models import kernels

    monkeypatch.delenv(kernels.GATES_ENV, raising=False)
    monkeypatch.setattr(kernels, "step_seconds", lambda *a: pytest.fail("measured"))
    loaded = storage.load_model(str(rnn_model))
    cluster = Placement(cluster=True, cpus=2)
    o = opts(rnn_model, "unused", prompts=str(prompt_file), address="head:6379")
    job = GenerateJob(o, loaded, SamplingSettings(), cluster)
    assert (job.s.gates, job.s.precision, job.kernels.how) == ("sigmoid", "fp32", "fixed")
    monkeypatch.setenv(kernels.GATES_ENV, "tanh")
    job = GenerateJob(o, loaded, SamplingSettings(precision="bf16"), cluster)
    assert (job.s.gates, job.s.precision) == ("tanh", "bf16")
    # An output written in another form (here, say) is finished in it there, unless set.
    monkeypatch.delenv(kernels.GATES_ENV)
    out = tmp_path / "written-here"
    out.mkdir()
    (out / "_kiln_job.json").write_text(json.dumps({"job": "generate", "gates": "tanh",
                                                    "precision": "bf16"}))
    o = opts(rnn_model, str(out), prompts=str(prompt_file), address="head:6379")
    job = GenerateJob(o, loaded, SamplingSettings(), cluster)
    assert (job.s.gates, job.s.precision, job.kernels.how) == ("tanh", "bf16", "resumed")
    job = GenerateJob(o, loaded, SamplingSettings(precision="fp32"), cluster)
    assert (job.s.gates, job.s.precision, job.kernels.how) == ("sigmoid", "fp32", "fixed")
    # An earlier kiln recorded no kernels: its output cannot be finished in a known form.
    (out / "_kiln_job.json").write_text(json.dumps({"job": "generate", "precision": "auto"}))
    with pytest.raises(OutputError, match="written by an earlier kiln"):
        GenerateJob(o, loaded, SamplingSettings(), cluster)
    assert GenerateJob(dataclasses.replace(o, overwrite=True), loaded, SamplingSettings(),
                       cluster).kernels.how == "fixed"


# --- the job on a local Ray ----------------------------------------------------------------

PROMPTS = ["def ", "import os", "", "class Foo(object):", "    return self.", "snow ☃ man",
           "x" * 300, "#", "for i in range(", "if __name__ == '__main__':"] * 4


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return f


def test_generate_rows_columns_and_summary(ray_local, rnn_model, prompt_file, tmp_path):
    out = tmp_path / "gen"
    summary = run_generate(opts(rnn_model, out, prompts=str(prompt_file), seed=3, top_k=20))
    table = OutputDir(str(out), {}).read_table()
    assert table.column_names == COLUMNS and table.num_rows == len(PROMPTS)
    got = rows(out)
    assert sorted(got) == list(range(1, len(PROMPTS) + 1))
    loaded = storage.load_model(str(rnn_model))
    settings = SamplingSettings(max_chars=40, top_k=20)
    for i in (1, 3, 7):  # the text is the continuation alone, as models.sample gives it
        r = got[i]
        assert r["prompt"] == PROMPTS[i - 1] and r["seed"] == row_seed(3, i)
        assert r["text"] == sample(loaded.model, loaded.vocab, [r["prompt"]], [r["seed"]],
                                   settings)[0]
        assert r["model"] == loaded.id and r["temperature"] == 1.0 and r["top_k"] == 20
    assert all(len(r["text"]) == 40 for r in got.values())
    assert got[6]["unknown_chars"] == 1 and got[1]["unknown_chars"] == 0
    assert summary["rows_in"] == summary["rows_written"] == len(PROMPTS)
    assert summary["unknown_chars"] == 4 and summary["prompts_with_unknown_chars"] == 4
    assert summary["empty_prompts"] == 4 and summary["truncated_prompts"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["model"] == loaded.id and summary["arguments"]["seed"] == 3

    again = run_generate(opts(rnn_model, out, prompts=str(prompt_file), seed=3, top_k=20))
    assert again["rows_written"] == 0 and again["rows_in_output"] == len(PROMPTS)
    assert OutputDir(str(out), {}).read_table().num_rows == len(PROMPTS)  # not appended to
    with pytest.raises(OutputError, match="differs in: seed"):
        run_generate(opts(rnn_model, out, prompts=str(prompt_file), seed=4, top_k=20))
    fresh = run_generate(opts(rnn_model, out, prompts=str(prompt_file), seed=4, top_k=20,
                              overwrite=True))
    assert fresh["rows_written"] == len(PROMPTS) and len(rows(out)) == len(PROMPTS)


def test_texts_do_not_depend_on_batch_size_or_actors(ray_local, rnn_model, prompt_file,
                                                     tmp_path):
    a = run_generate(opts(rnn_model, tmp_path / "a", prompts=str(prompt_file), batch_size=64,
                          actors=1, temperature=0.8))
    b = run_generate(opts(rnn_model, tmp_path / "b", prompts=str(prompt_file), batch_size=7,
                          actors=2, temperature=0.8))
    assert a["rows_written"] == b["rows_written"] == len(PROMPTS)
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert {k: r["text"].encode() for k, r in ra.items()} == \
        {k: r["text"].encode() for k, r in rb.items()}
    assert len({r["text"] for r in ra.values()}) > 10  # sampled, not all the same
    # With no Ray running, the job runs without Ray, a block for each core (40 prompts are
    # fewer than the lanes of one) sampled in a process forked for it: the same texts.
    cmd = [sys.executable, "-m", "kiln", "generate", "--model", str(rnn_model), "--prompts",
           str(prompt_file), "--output", str(tmp_path / "c"), "--max-chars", "40",
           "--temperature", "0.8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    per = -(-len(PROMPTS) // len(os.sched_getaffinity(0)))  # rows a block
    blocks = -(-len(PROMPTS) // per)
    how = (f"without Ray in {blocks} processes forked from this one"
           if blocks > 1 and can_fork() else f"in this process on {blocks} thread(s)")
    assert f"{blocks} unit(s) {how}" in res.stderr, res.stderr
    assert {k: r["text"].encode() for k, r in rows(tmp_path / "c").items()} == \
        {k: r["text"].encode() for k, r in ra.items()}


def test_unconditional_greedy_with_stop(ray_local, rnn_model, tmp_path):
    out = tmp_path / "u"
    summary = run_generate(opts(rnn_model, out, num_samples=5, temperature=0, stop="\n",
                                max_chars=80))
    got = rows(out)
    assert sorted(got) == [0, 1, 2, 3, 4] and summary["empty_prompts"] == 5
    texts = {r["text"] for r in got.values()}
    assert len(texts) == 1  # greedy: the seed does not matter
    assert "\n" not in texts.pop()


def test_killed_run_resumes_with_every_prompt_once(rnn_model, tmp_path):
    n = 512
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"def f{i}(x):" for i in range(n)) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kiln", "generate", "--model", str(rnn_model), "--prompts",
           str(prompts), "--output", str(out), "--max-chars", "300", "--batch-size", "64"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["KILN_OBJECT_STORE_MB"] = "200"
    log = tmp_path / "first-run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # Ray's start; generous for a busy machine
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, f"the run ended early: {log.read_text()[-1500:]}"
            assert time.monotonic() < deadline, "no part was written in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(30)
    # An actor of the killed run may still finish its part; the re-run copes with that.
    assert 0 < OutputDir(str(out), {}).written(["id"]).rows < n
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = OutputDir(str(out), {}).read_table().column("id").to_pylist()
    assert sorted(ids) == list(range(1, n + 1))  # every prompt exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_resumed"] > 0 and summary["rows_written"] > 0
    assert summary["rows_resumed"] + summary["rows_written"] == n


def test_parquet_with_string_ids(ray_local, rnn_model, tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a/1", "b 2", "c"], "prompt": ["def ", "", "x"]}), buf)
    (tmp_path / "p.parquet").write_bytes(buf.getvalue())
    run_generate(opts(rnn_model, tmp_path / "o", prompts=str(tmp_path / "p.parquet")))
    got = rows(tmp_path / "o")
    assert sorted(got) == ["a/1", "b 2", "c"]
    assert got["a/1"]["seed"] == row_seed(0, "a/1")


def test_parts_written_late_by_a_killed_run_are_removed(tmp_path):
    from rich.console import Console

    from kiln.bulk.run import remove_late_parts
    from kiln.pipelines.sink import write_part

    out = OutputDir(str(tmp_path), {})
    old, late = out.part_uri("0000000000"), out.part_uri("0000000064")
    write_part(old, pa.table({"id": [1]}))
    before = set(out.parts())
    out.run_id = "newrun00"
    mine = out.part_uri("0000000000")
    write_part(mine, pa.table({"id": [2]}))
    write_part(late, pa.table({"id": [2]}))  # the old run id, after `before` was read
    remove_late_parts(out, before, Console(file=io.StringIO()))
    assert sorted(out.parts()) == sorted([old, mine])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_a_gpu(ray_local, rnn_model, prompt_file, tmp_path):
    summary = run_generate(opts(rnn_model, tmp_path / "g", prompts=str(prompt_file), gpu=True))
    assert summary["rows_written"] == len(PROMPTS)
    assert all(len(r["text"]) == 40 for r in rows(tmp_path / "g").values())
