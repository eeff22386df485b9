"""Unit tests of models/: shapes, learning, sampling and the vocabulary. No Ray."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from kiln.models import (
    CNN_ARCHS,
    CharRNN,
    CharVocab,
    SamplingSettings,
    build_cnn,
    row_seed,
    sample,
)


@pytest.mark.parametrize("arch", ["mnist_cnn", "resnet8", "resnet20", "resnet18",
                                  "mobilenet_v3_small"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 40), (3, 64)])
def test_cnn_output_shape(arch, channels, size):
    net = build_cnn(arch, num_classes=7, channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = net(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        build_cnn("nope", 10, 1, 28)
    assert all(arch in str(e.value) for arch in CNN_ARCHS)


def test_cnn_overfits_a_tiny_batch():
    torch.manual_seed(0)
    net = build_cnn("mnist_cnn", 4, 1, 28)
    net.eval()  # no dropout: the loss must fall by itself
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_rnn_shapes_and_step_matches_forward(cell):
    torch.manual_seed(0)
    net = CharRNN(30, cell, embed=8, hidden=16, layers=2).eval()
    x = torch.randint(0, 30, (4, 9))
    logits, _ = net(x)
    assert logits.shape == (4, 9, 30)
    state = net.init_state(4)
    for t in range(9):
        step_logits, state = net.step(x[:, t], state)
    torch.testing.assert_close(step_logits, logits[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_rnn_overfits_a_tiny_batch(cell):
    torch.manual_seed(0)
    net = CharRNN(12, cell, embed=16, hidden=64, layers=2)
    x = torch.randint(0, 12, (8, 21))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(200):
        logits, _ = net(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12), x[:, 1:].reshape(-1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_rnn_dropout_acts_in_training_only(layers):
    torch.manual_seed(0)
    model = CharRNN(20, "lstm", 8, 32, layers, dropout=0.5)
    x = torch.randint(0, 20, (4, 12))
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.allclose(a, b)  # a fresh mask each pass
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    if layers > 1:  # between the recurrent layers as well as before the output
        assert model.rnn.dropout == 0.5


def test_vocab_round_trip_and_unknown_policy():
    text = "hello, wörld!\n\tπ"
    v = CharVocab.build(text)
    assert v.decode(v.encode(text)) == text
    assert v.encode("z") == [0] and v.count_unknown("hez€") == 2
    assert CharVocab(v.chars) == v
    rare = CharVocab.build("aaab", min_count=2)
    assert rare.chars == ["a"] and rare.encode("b") == [0]
    with pytest.raises(ValueError):
        CharVocab(["a", "a"])


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    vocab = CharVocab.build("abcdefgh \n")
    return CharRNN(len(vocab), "lstm", embed=8, hidden=32, layers=2).eval(), vocab


def test_sampling_is_reproducible_per_seed(tiny_lm):
    net, vocab = tiny_lm
    s = SamplingSettings(max_chars=40, temperature=1.0)
    a = sample(net, vocab, ["abc", "h"], [1, 2], s)
    assert a == sample(net, vocab, ["abc", "h"], [1, 2], s)
    assert all(len(t) == 40 and set(t) <= set(vocab.chars) for t in a)
    assert sample(net, vocab, ["abc"], [3], s) != a[:1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_does_not_depend_on_the_batch(tiny_lm, precision):
    """Alone, together or reversed, a row gets the same text, with float32 products or with
    bfloat16 ones (`SamplingSettings.precision`; where this CPU has oneDNN's bf16 kernels)."""
    from kiln.models import stepper

    if precision == "bf16" and not stepper.bf16_linear():
        pytest.skip("this CPU has no bf16 matrix kernels")
    net, vocab = tiny_lm
    prompts = ["a", "bbbbbbbbbbbbbb", "", "cafe", "h", "deadbeef"] * 3
    seeds = [row_seed(7, i) for i in range(len(prompts))]
    s = SamplingSettings(max_chars=30, temperature=0.9, top_k=5, lanes=4, precision=precision)
    together = sample(net, vocab, prompts, seeds, s)
    alone = [sample(net, vocab, [p], [sd], s)[0] for p, sd in zip(prompts, seeds, strict=True)]
    reversed_ = sample(net, vocab, prompts[::-1], seeds[::-1], s)[::-1]
    assert together == alone == reversed_


@pytest.mark.parametrize("onednn", [True, False])
def test_few_sequences_step_narrower_and_keep_their_texts(tiny_lm, onednn, monkeypatch):
    """Fewer prompts than lanes, and a block's last sequences once none waits, step at a
    narrower width, where every row's step is the same bits at both widths: so no text
    changes, with either kernel; a kernel whose rows depend on the width keeps every step at
    the full width."""
    from kiln.models import sampling, stepper

    if onednn and not stepper.onednn_linear():
        pytest.skip("torch has no oneDNN linear on this machine")
    monkeypatch.setattr(stepper, "onednn_linear", lambda: onednn)
    monkeypatch.setattr(stepper, "_AGREES", {})
    net, vocab = tiny_lm
    prompts = [("abcdefgh " * 9)[: i % 70] for i in range(300)]  # more than the 256 lanes
    seeds = [row_seed(5, i) for i in range(300)]
    s = SamplingSettings(max_chars=30, temperature=0.9, stop="h")
    widths: list[int] = []
    real_pick = sampling.pick

    def spy(logits, *args):
        widths.append(logits.shape[0])
        return real_pick(logits, *args)

    monkeypatch.setattr(sampling, "pick", spy)
    narrow = stepper.Stepper(net).width_for(5, sampling.LANES)
    if onednn:  # x86-64: oneDNN's rows agree at every width, and 8 x 32 floats align
        assert narrow == 8
    together = sample(net, vocab, prompts, seeds, s)
    assert widths[0] == sampling.LANES and min(widths) == min(narrow, sampling.LANES)
    widths.clear()
    few = sample(net, vocab, prompts[200:205], seeds[200:205], s)
    assert set(widths) == {narrow}
    alone = [sample(net, vocab, [p], [sd], s)[0] for p, sd in zip(prompts[:12], seeds[:12],
                                                                   strict=True)]
    assert few == together[200:205] and alone == together[:12]

    real_linear = stepper.Linear.__call__

    def by_width(self, x, add=None):  # a kernel whose rounding follows the batch's rows
        y = real_linear(self, x, add)
        return y + 1e-3 * (x.shape[0] != sampling.LANES)

    monkeypatch.setattr(stepper.Linear, "__call__", by_width)
    monkeypatch.setattr(stepper, "_AGREES", {})
    widths.clear()
    wide = sample(net, vocab, prompts[200:205], seeds[200:205], s)
    assert set(widths) == {sampling.LANES}
    assert wide == [sample(net, vocab, [p], [sd], s)[0] for p, sd in
                    zip(prompts[200:205], seeds[200:205], strict=True)]


@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm-tanh", "gru-bf16", "lstm-tanh-bf16"])
def test_a_narrow_step_gives_every_row_the_bits_of_a_full_one(cell):
    """An odd hidden size and vocabulary: a narrow step's tensors would end in the scalar
    remainder of the pointwise loops, whose rounding differs; the widths the sampler takes
    are the ones where a row, at any lane, gets the same bits as at full width (an LSTM's
    gates through sigmoid, or through tanh alone; products in float32 or bfloat16)."""
    from kiln.models.stepper import LANES, Stepper, bf16_linear

    cell, *form = cell.split("-")
    if "bf16" in form and not bf16_linear():
        pytest.skip("this CPU has no bf16 matrix kernels")
    torch.manual_seed(1)
    net = CharRNN(65, cell, embed=8, hidden=33, layers=2).eval()
    stepper = Stepper(net, tanh_gates="tanh" in form, bf16="bf16" in form)
    width = stepper.width_for(5, LANES)
    assert width % 64 == 0  # 33 floats a row: only whole multiples of 64 lanes
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        x = torch.randint(1, 65, (LANES,), generator=g)
        state = [torch.randn(LANES, 33, generator=g) for _ in stepper.init_state(1)]
        wide_logits, wide = stepper(x, state)
        at = trial * 7 % (LANES - width + 1)  # the rows sit at another lane
        rows = slice(at, at + width)
        logits, narrow = stepper(x[rows], [t[rows] for t in state])
        assert torch.equal(logits, wide_logits[rows])
        assert all(torch.equal(a, b[rows]) for a, b in zip(narrow, wide, strict=True))


def test_greedy_top_k_and_stop(tiny_lm):
    net, vocab = tiny_lm
    g = SamplingSettings(max_chars=25, temperature=0)
    assert sample(net, vocab, ["ab"], [1], g) == sample(net, vocab, ["ab"], [999], g)
    one = sample(net, vocab, ["ab"] * 3, [1, 2, 3], SamplingSettings(max_chars=25, top_k=1))
    assert one[0] == one[1] == one[2] == sample(net, vocab, ["ab"], [1], g)[0]
    full = sample(net, vocab, ["a"], [5], SamplingSettings(max_chars=60))[0]
    stop = full[10:12]
    cut = sample(net, vocab, ["a"], [5], SamplingSettings(max_chars=60, stop=stop))[0]
    assert cut == full.split(stop, 1)[0] and stop not in cut


def test_row_seed_depends_on_seed_and_id_and_nothing_else():
    """A row's text must not depend on the process that draws it: the same seed in another
    interpreter (another string-hash seed), and a value that fits int64."""
    other = subprocess.run([sys.executable, "-c", "from kiln.models.sampling import row_seed; "
                            "print(row_seed(0, 'a'), row_seed(7, 12))"], check=True,
                           capture_output=True, text=True, env={**os.environ,
                                                                "PYTHONHASHSEED": "123"})
    assert other.stdout.split() == [str(row_seed(0, "a")), str(row_seed(7, 12))]
    assert len({row_seed(0, "a"), row_seed(1, "a"), row_seed(0, "b")}) == 3
    assert all(0 <= row_seed(s, i) < 2**63 for s in (0, 2**40) for i in ("a", 5, "é"))


def test_import_models_does_not_import_ray():
    code = "import sys, kiln.models; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "lstm-tanh", "gru", "rnn", "lstm-bf16",
                                  "lstm-tanh-bf16", "gru-bf16", "rnn-bf16"])
def test_stepper_matches_step(cell, onednn, monkeypatch):
    """The sampler's step is the model's step, with either kernel and, for an LSTM, either
    form of its gates (sigmoid, or tanh alone: models.kernels times both); with bfloat16
    products (oneDNN's only), to bfloat16's precision."""
    from kiln.models import stepper
    from kiln.models.stepper import Stepper

    cell, *form = cell.split("-")
    if onednn and not stepper.onednn_linear():
        pytest.skip("torch has no oneDNN linear on this machine")
    if "bf16" in form and not (onednn and stepper.bf16_linear()):
        pytest.skip("bf16 products are oneDNN's, where this CPU has its bf16 kernels")
    monkeypatch.setattr(stepper, "onednn_linear", lambda: onednn)
    torch.manual_seed(0)
    net = CharRNN(30, cell, embed=8, hidden=16, layers=3).eval()
    fast = Stepper(net, tanh_gates="tanh" in form, bf16="bf16" in form)
    a, b = net.init_state(5), fast.init_state(5)
    for _ in range(12):
        x = torch.randint(0, 30, (5,))
        la, a = net.step(x, a)
        lb, b = fast(x, b)
    # bf16 keeps 8 bits of a product's inputs and of its result
    tol = {"rtol": 2e-2, "atol": 2e-2} if "bf16" in form else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(la, lb, **tol)


def test_sampling_products_take_oneDNN_on_x86_and_rows_keep_to_themselves(monkeypatch):
    """Both kernels of models.stepper.Linear give x @ W.T + b + add, and a row's result is
    the same bits whatever the other rows hold (what keeps texts independent of the batch)."""
    from kiln.models import stepper

    if platform.machine() == "x86_64" and torch.backends.mkldnn.is_available():
        assert stepper.onednn_linear()  # the fast kernel, not a silent fallback
    g = torch.Generator().manual_seed(3)
    few = torch.randn(10, 48, generator=g)  # MKL's addmm alone puts a row's bits by its place
    for onednn in {False, stepper.onednn_linear()}:
        monkeypatch.setattr(stepper, "onednn_linear", lambda on=onednn: on)
        lin = stepper.Linear(few, torch.randn(10, generator=g), torch.device("cpu"))
        rows = torch.randn(256, 48, generator=g)
        perm = torch.randperm(256, generator=g)
        assert torch.equal(lin(rows[perm]), lin(rows)[perm])
        assert torch.equal(lin(rows[perm], rows[perm, :10]), lin(rows, rows[:, :10])[perm])
    w, b = torch.randn(64, 48, generator=g).double(), torch.randn(64, generator=g).double()
    x, add = torch.randn(256, 48, generator=g), torch.randn(256, 64, generator=g)
    other = x.clone()
    other[1:] = torch.randn(255, 48, generator=g)
    for onednn in {False, stepper.onednn_linear()}:
        monkeypatch.setattr(stepper, "onednn_linear", lambda on=onednn: on)
        for bias in (b, None):
            lin = stepper.Linear(w, bias, torch.device("cpu"))
            assert lin.onednn == onednn
            want = x.double() @ w.T + add.double() + (0 if bias is None else b)
            y = lin(x, add)
            torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(lin(x), (want - add.double()).float(), rtol=1e-5,
                                       atol=1e-4)
            assert torch.equal(lin(other, add)[0], y[0])
            assert torch.equal(lin(other)[0], lin(x)[0])
            perm = torch.randperm(256, generator=g)  # a row's lane does not change its bits
            assert torch.equal(lin(x[perm], add[perm]), y[perm])


def test_long_prompts_keep_their_end_and_lanes_refill(tiny_lm):
    net, vocab = tiny_lm
    s = SamplingSettings(max_chars=20, lanes=3, max_prompt_chars=50, stop="a")
    long = "abcdefgh " * 20  # 180 chars: the last 50 are fed
    prompts = [long, "h", "", long[-50:], "ab", "c"]
    seeds = [11, 12, 13, 11, 15, 16]
    got = sample(net, vocab, prompts, seeds, s)
    assert got[0] == got[3]
    alone = [sample(net, vocab, [p], [sd], s)[0] for p, sd in zip(prompts, seeds, strict=True)]
    assert got == alone and all("a" not in t for t in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_a_gpu_under_bf16_autocast(tiny_lm):
    net, vocab = tiny_lm
    s = SamplingSettings(max_chars=30, temperature=0.9)
    seeds = [row_seed(1, i) for i in range(5)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = sample(net.cuda(), vocab, ["ab", "", "h", "cafe", "g"], seeds, s, device="cuda")
    net.cpu()
    assert all(len(t) == 30 and set(t) <= set(vocab.chars) for t in got)


def test_the_kernels_follow_the_measurement_and_are_kept_per_cpu(tmp_path, monkeypatch):
    """A fake timer that prefers each form in turn gets that form; the choice is cached per
    CPU model, torch version and model shape, and measured again where any of them differs;
    KILN_GATES and a fixed precision narrow what is measured; a GRU has no gates to choose."""
    from kiln.models import kernels

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(kernels.GATES_ENV, raising=False)
    monkeypatch.setattr(kernels, "_MEMO", {})
    lstm = CharRNN(30, "lstm", embed=8, hidden=16, layers=2).eval()
    forms = kernels.candidates(lstm, "auto")
    assert ("sigmoid", "fp32") in forms and ("tanh", "fp32") in forms
    assert (("tanh", "bf16") in forms) == stepper_bf16()
    timed = []

    def prefer(form):
        def measure(model, gates, products, lanes):
            timed.append((gates, products, torch.get_num_threads()))
            return 1.0 if (gates, products) == form else 2.0
        return measure

    for form in forms:
        got = kernels.choose(lstm, "auto", 256, measure=prefer(form), use_cache=False)
        assert (got.gates, got.products, got.how) == (*form, "measured")
    assert {t[2] for t in timed} == {1}  # on one thread, a sampling worker's
    first = kernels.choose(lstm, "auto", 256, measure=prefer(forms[-1]))
    timed.clear()
    again = kernels.choose(lstm, "auto", 256, measure=prefer(forms[0]))
    assert timed == [] and (again.gates, again.products, again.how) == (
        first.gates, first.products, "cached")
    monkeypatch.setattr(kernels, "_MEMO", {})  # another process reads the file
    assert kernels.choose(lstm, "auto", 256, measure=prefer(forms[0])).how == "cached"
    monkeypatch.setattr(kernels, "cpu_model", lambda: "another CPU")
    assert kernels.choose(lstm, "auto", 256, measure=prefer(forms[0])).how == "measured"
    wider = CharRNN(30, "lstm", embed=8, hidden=32, layers=2).eval()
    assert kernels.choose(wider, "auto", 256, measure=prefer(forms[0])).how == "measured"

    assert {p for _, p in kernels.candidates(lstm, "fp32")} == {"fp32"}
    monkeypatch.setenv(kernels.GATES_ENV, "tanh")
    assert {g for g, _ in kernels.candidates(lstm, "auto")} == {"tanh"}
    monkeypatch.setenv(kernels.GATES_ENV, "relu")
    with pytest.raises(ValueError, match="KILN_GATES must be one of sigmoid, tanh"):
        kernels.candidates(lstm, "auto")
    monkeypatch.delenv(kernels.GATES_ENV)
    gru = CharRNN(30, "gru", embed=8, hidden=16, layers=2).eval()
    assert kernels.choose(gru, "fp32", 256).how == "set"  # one form: nothing to measure
    assert kernels.choose(lstm, "fp32", 256, gates="sigmoid") == kernels.Kernels(
        "sigmoid", "fp32", how="set")


def test_a_real_measurement_picks_a_form_and_sample_takes_it(tmp_path, monkeypatch, tiny_lm):
    """Timed for real on this CPU: one of the candidates, cached; sample() at the settings
    left open gives the texts of the form chosen, set explicitly."""
    from kiln.models import LANES, kernels

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_MEMO", {})
    net, vocab = tiny_lm
    got = kernels.choose(net, "auto", LANES)
    assert (got.gates, got.products) in kernels.candidates(net, "auto")
    assert got.how == "measured" and got.step_s > 0 and got.probe_s > 0
    assert (tmp_path / "kernels.json").exists()
    s = SamplingSettings(max_chars=30)
    fixed = SamplingSettings(max_chars=30, precision=got.products, gates=got.gates)
    prompts, seeds = ["ab", "b", ""], [1, 2, 3]
    assert sample(net, vocab, prompts, seeds, s) == sample(net, vocab, prompts, seeds, fixed)


def stepper_bf16() -> bool:
    from kiln.models.stepper import bf16_linear

    return bf16_linear()
