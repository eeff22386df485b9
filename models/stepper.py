"""One character-level step of a CharRNN for the sampler (`Stepper`), on kernels chosen for
the device, with the property batched sampling rests on: each row's result is the same bits
whatever the other rows hold, whichever lane it sits in, and at every width a step takes
(`Stepper.width_for`). `models.sampling` runs the loop over these steps."""

from __future__ import annotations

import functools
import platform

import torch

from .rnn import CharRNN

# Sequences advanced together each step, at most (fewer sequences step narrower where a row's
# bits do not change with the width: Stepper.width_for).
# On a CPU core a 2x256 LSTM samples fastest at about 256 lanes (bench/generate.py sweeps 64
# to 512: BENCHMARKS.md, Generation section): wider steps amortize each step's Python and
# numpy overhead, until the step's buffers outgrow the caches. On a GPU the step costs about
# the same at any width up to thousands of lanes (bench/gpu.py).
LANES = 256
GPU_LANES = 1024
# Narrower widths a step may take when fewer sequences are left to step (a small job, a
# block's tail), where the kernels give each row the same bits at that width as at the lanes
# (`Stepper.agrees`, probed once per shape): 8 sequences step far more cheaply than 256 lanes.
WIDTHS = (8, 16, 32, 64, 96, 128, 160, 192, 224, 256, 384, 512, 640, 768, 896)


@functools.cache
def bf16_linear() -> bool:
    """Whether oneDNN runs bf16 products on this CPU (with or without AMX) and they agree
    with fp32 ones to bf16's precision on a trial product."""
    if not onednn_linear():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 40, generator=g), torch.randn(8, 40, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 8)
        got = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], "")
    except Exception:  # a CPU oneDNN has no bf16 kernel for, or another schema
        return False
    return bool(torch.allclose(got.float(), x @ w.T, rtol=0.05, atol=0.1))


@functools.cache
def onednn_linear() -> bool:
    """Whether this process's CPU matrix products in sampling go through oneDNN's linear
    (`torch.ops.mkldnn._linear_pointwise`, on a weight packed once) rather than addmm.
    oneDNN picks its kernel by instruction set; the MKL behind addmm takes its AVX2 path on
    AMD's AVX-512 CPUs, where oneDNN runs a sampling step's products faster (measured:
    BENCHMARKS.md, Generation section). x86-64 only, where it was measured; and only where
    it agrees with addmm on a trial product."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
        x, add = torch.randn(8, 40, generator=g), torch.randn(8, 48, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        got_add = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add")
    except Exception:  # a torch without the op, or with another schema: addmm
        return False
    return bool(torch.allclose(got, torch.addmm(b, x, w.T), rtol=1e-4, atol=1e-4)
                and torch.allclose(got_add, torch.addmm(add, x, w.T), rtol=1e-4, atol=1e-4))


class Linear:
    """x @ W.T (+ bias) (+ add) for one float32 weight W (out, in) on a device: oneDNN's
    linear on a CPU where `onednn_linear()`, addmm elsewhere. Either way a row of the result
    depends only on the same row of x (and of add), wherever it sits in the batch: MKL's
    addmm does not keep to that for 5-11 output columns (a row's bits follow its position;
    measured on an AVX2 EPYC, any depth), so there a weight whose columns are not a multiple
    of 16 is padded with zero columns to one, and the bias and `add` are added after the
    product. bf16: oneDNN's product of x and W rounded to bfloat16 (`bf16_linear()`), its
    result (bf16) back in float32 before the float32 bias and `add`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 bf16: bool = False):
        weight = weight.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous().to(device)
        self.onednn = device.type == "cpu" and onednn_linear()
        self.bf16 = bf16
        if bf16 and not (self.onednn and bf16_linear()):
            raise ValueError("bf16 products need oneDNN's bf16 kernels on a CPU")
        self.out, self.pad = weight.shape[0], 0
        if bf16:
            self.w = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), LANES)
        elif self.onednn:  # packed for oneDNN's layout; the batch size is only a hint
            self.w = torch.ops.mkldnn._reorder_linear_weight(weight, LANES)
        else:  # (in, out), as addmm takes it
            self.pad = -self.out % 16
            if self.pad:
                weight = torch.cat([weight, weight.new_zeros(self.pad, weight.shape[1])])
            self.w = weight.T.contiguous().to(device)

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in) float32 (the sampling state is float32 even under autocast)."""
        if self.bf16:
            y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.w, None, "none", [], "")
            y = y.float()
            if add is not None:
                y.add_(add)
            return y if self.bias is None else y.add_(self.bias)
        if self.onednn:
            if add is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.w, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.w, self.bias, "add")
        if self.pad:
            y = (x @ self.w)[:, : self.out]
            y = y if self.bias is None else y + self.bias
            return (y if add is None else y + add).contiguous()
        if add is None:
            return x @ self.w if self.bias is None else torch.addmm(self.bias, x, self.w)
        return torch.addmm(add if self.bias is None else add + self.bias, x, self.w)


class Stepper:
    """CharRNN.step with its weights rearranged for one-character steps: the first layer's
    input projection is a table lookup (the embedding times W_ih, precomputed once per
    vocabulary entry), an upper LSTM/RNN layer does one matrix product over [input, hidden]
    instead of two, and an LSTM's gates take one nonlinearity, the cheaper on the device
    (measured: models.kernels): either the cell gate comes pre-doubled so that its tanh is taken as
    2 sigmoid(2x) - 1, or the other three come halved so that their sigmoids are taken as
    (1 + tanh(x / 2)) / 2. The products run on `Linear`, the recurrent layers' in bfloat16
    where that is faster (models.kernels). Same model; the rounding differs from `step`."""

    def __init__(self, model: CharRNN, device: torch.device | str | None = None, *,
                 tanh_gates: bool = False, bf16: bool = False):
        """tanh_gates: an LSTM's gates through tanh alone, or through sigmoid. bf16: the
        recurrent layers' products in bfloat16 (a CPU with oneDNN's bf16 kernels). Which is
        faster on a CPU is measured there (models.kernels)."""
        r, self.cell, self.layers = model.rnn, model.cell, model.layers
        self.relu = getattr(r, "nonlinearity", "tanh") == "relu"
        self.device = torch.device(device or "cpu")
        self.bf16 = bf16
        self.tanh_cell = self.cell == "lstm" and tanh_gates
        # Halving or doubling a gate's rows is exact in floating point.
        scale = torch.ones(4 * model.hidden if self.cell == "lstm" else 1, dtype=torch.float64)
        if self.tanh_cell:  # sigmoid(y) = (1 + tanh(y / 2)) / 2 for the input, forget, output gates
            scale[: 2 * model.hidden] = scale[3 * model.hidden :] = 0.5
        elif self.cell == "lstm":  # tanh(y) = 2 sigmoid(2y) - 1 for the cell gate
            scale[2 * model.hidden : 3 * model.hidden] = 2.0

        def g(name: str) -> torch.Tensor:
            t = getattr(r, name).detach().cpu().double()  # (G*H,) or (G*H, in)
            return t * (scale if t.dim() == 1 else scale[:, None])

        def linear(w: torch.Tensor, b: torch.Tensor | None) -> Linear:
            return Linear(w, b, self.device, self.bf16)

        fuse_bias = self.cell != "gru"  # a GRU's b_hn sits inside r * (W_hn h + b_hn)
        # (V, G*H); built in float64 so its float32 bits do not depend on the GEMM kernel.
        table = model.embed.weight.detach().cpu().double() @ g("weight_ih_l0").T + g(
            "bias_ih_l0")
        if fuse_bias:
            table = table + g("bias_hh_l0")
        self.table = table.float().contiguous().to(self.device)
        # Per layer (input projection, hidden projection); layer 0's input is the table, and
        # an upper LSTM/RNN layer has one product over [x, h] (B, 2H).
        self.proj: list[tuple[Linear | None, Linear | None]] = []
        for k in range(self.layers):
            w_ih, w_hh, b_ih, b_hh = (g(f"{n}_l{k}") for n in ("weight_ih", "weight_hh",
                                                                "bias_ih", "bias_hh"))
            if k == 0:
                self.proj.append((None, linear(w_hh, None if fuse_bias else b_hh)))
            elif fuse_bias:
                self.proj.append((linear(torch.cat([w_ih, w_hh], 1), b_ih + b_hh), None))
            else:
                self.proj.append((linear(w_ih, b_ih), linear(w_hh, b_hh)))
        # The head stays float32: a logit's rounding in bf16 (1 part in 256) would move its
        # character's probability by several percent.
        self.head = Linear(model.head.weight.detach().cpu().double(),
                           model.head.bias.detach().cpu().double(), self.device)
        self.hidden = model.hidden
        # What picks the kernels of a step, beside its width.
        self.signature = (self.cell, self.relu, self.layers, self.hidden, self.table.shape[0],
                          str(self.device), self.head.onednn, self.tanh_cell, self.bf16)
        self._trials: dict[tuple, list] = {}  # agrees(): full-width steps on random inputs

    def width_for(self, n: int, lanes: int) -> int:
        """The narrowest of WIDTHS below `lanes` that holds n sequences and at which every
        row's step is the same bits as at `lanes`; else `lanes`."""
        for width in WIDTHS:
            if n <= width < lanes and self.aligned(width) and self.agrees(width, lanes):
                return width
        return lanes

    def aligned(self, width: int) -> bool:
        """Whether every tensor a step `width` lanes wide takes a sigmoid or tanh of, (width,
        H) and (width, gates), holds a multiple of 64 floats. torch's pointwise loops run
        SIMD over a contiguous tensor's elements and a scalar remainder at its end, whose
        rounding differs: in an aligned step no row has elements in a remainder, at any
        width (`pick` pads its rows for NumPy's exp)."""
        gates = {"lstm": 4, "gru": 3}.get(self.cell, 1) * self.hidden
        return all(width * n % 64 == 0 for n in (self.hidden, gates))

    def agrees(self, width: int, lanes: int) -> bool:
        """Whether a step `width` lanes wide gives each of its rows the bits the same row gets
        in a step `lanes` wide at another lane (the last `width` of them). A matrix kernel may
        take another path for fewer rows, which would tie a text to its batch; a kernel's path
        depends on the shapes, the device, the threads and autocast, which key the answer,
        not on the values: two trials on random inputs answer for the shape (cached)."""
        autocast = torch.is_autocast_enabled(self.device.type)
        key = (self.signature, width, lanes, torch.get_num_threads(), autocast,
               torch.get_autocast_dtype(self.device.type) if autocast else None)
        if key not in _AGREES:
            rows, same = slice(lanes - width, lanes), True
            for x, state, wide_logits, wide in self._trial_steps(key[2:], lanes):
                logits, narrow = self(x[rows], [t[rows] for t in state])
                same = same and torch.equal(logits, wide_logits[rows]) and all(
                    torch.equal(a, b[rows]) for a, b in zip(narrow, wide, strict=True))
            _AGREES[key] = same
        return _AGREES[key]

    def _trial_steps(self, key: tuple, lanes: int) -> list:
        """Two full-width steps on random inputs (states of two scales), and their results."""
        if key not in self._trials:
            g = torch.Generator().manual_seed(lanes)
            trials = []
            for scale in (1.0, 0.1):
                x = torch.randint(1, self.table.shape[0], (lanes,), generator=g).to(self.device)
                state = [(torch.randn(lanes, self.hidden, generator=g) * scale).to(self.device)
                         for _ in self.init_state(1)]
                trials.append((x, state, *self(x, state)))
            self._trials[key] = trials
        return self._trials[key]

    def init_state(self, lanes: int) -> list[torch.Tensor]:
        """[h_0, .., h_{L-1}] (+ [c_0, ..] for an LSTM), each (lanes, H)."""
        n = self.layers * (2 if self.cell == "lstm" else 1)
        return [torch.zeros(lanes, self.hidden, device=self.device) for _ in range(n)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, state: list[torch.Tensor]):
        """x (B,) int64 -> logits (B, V) float32, new state."""
        n_layers, inp, new = self.layers, None, list(state)
        for k in range(n_layers):
            h = state[k]
            p_in, p_h = self.proj[k]
            if self.cell == "gru":
                gi = self._lookup(x) if k == 0 else p_in(inp)  # (B, 3H)
                h = self._gru(gi.float(), p_h(h).float(), h)
            else:
                gates = p_h(h, self._lookup(x)) if k == 0 else p_in(torch.cat([inp, h], 1))
                gates = gates.float()  # under bf16 autocast the state stays float32
                if self.tanh_cell:
                    h, new[n_layers + k] = self._lstm_tanh(gates, state[n_layers + k])
                elif self.cell == "lstm":
                    h, new[n_layers + k] = self._lstm(gates, state[n_layers + k])
                else:
                    h = torch.relu(gates) if self.relu else torch.tanh(gates)
            new[k] = inp = h  # (B, H)
        return self.head(inp), new

    def _lookup(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.table, 0, x)  # (B, G*H); much cheaper than table[x]

    @staticmethod
    def _lstm(gates, c):
        # PyTorch's gate order: input, forget, cell (here doubled), output. One sigmoid over
        # all four gates; tanh(y) = 2 sigmoid(2y) - 1.
        s = torch.sigmoid(gates).view(gates.shape[0], 4, -1)  # (B, 4, H)
        i, f, g2, o = s.unbind(1)
        c = torch.addcmul(f * c, i, g2.mul(2).sub_(1))
        return o * torch.sigmoid(c * 2).mul_(2).sub_(1), c

    @staticmethod
    def _lstm_tanh(gates, c):
        # The input, forget and output gates' rows come halved: each is (1 + tanh) / 2, so
        # c' = f c + i g = (c + g + tf c + ti g) / 2 and h = o tanh(c') = (th + to th) / 2.
        t = torch.tanh(gates).view(gates.shape[0], 4, -1)  # (B, 4, H)
        ti, tf, g, to = t.unbind(1)
        c = torch.addcmul(torch.addcmul(c + g, tf, c), ti, g).mul_(0.5)
        th = torch.tanh(c)
        return torch.addcmul(th, to, th).mul_(0.5), c

    @staticmethod
    def _gru(gi, gh, h):
        # PyTorch's gate order: reset, update, new.
        ir, iz, i_n = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * hn)
        return n + z * (h - n)


_AGREES: dict[tuple, bool] = {}
