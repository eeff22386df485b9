"""What a training worker is fed: shuffled training rows (a class-per-folder archive and text
are stored in order), the in-memory shard cache, and validation and the all-reduces under a
real process group (gloo here; NCCL on a GPU)."""

import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from jobs.train_loop import CNNTask, RNNTask, ShardCache, all_sum, evaluate, past_deadline
from models import CharVocab, build_model
from models.checkpoint import CNNSpec, RNNSpec


def test_image_training_rows_are_shuffled_across_classes(ray_local, digits_data, tmp_path):
    from jobs import embedded
    from pipelines.train_data import image_dataset
    from pipelines.transforms import ImagePreset

    pngs, labels = digits_data
    order = sorted(range(len(pngs)), key=lambda i: labels[i])  # class folder after class folder
    tar = embedded.write_class_tar(tmp_path / "sorted.tar", [pngs[i] for i in order],
                                   [labels[i] for i in order])

    def first_classes(seed):
        data = image_dataset(str(tar), ImagePreset(), 0.1, seed=seed)
        rows = next(iter(data.train.iter_batches(batch_size=64, batch_format="numpy")))
        return set(rows["label"].tolist()), data.train.count()

    in_order, n = first_classes(None)
    shuffled, n_shuffled = first_classes(0)
    assert len(in_order) <= 2  # the tar lists its class folders one after another
    assert len(shuffled) >= 8 and n_shuffled == n  # the same rows, in a mixed order


def test_text_windows_are_shuffled_by_seed(ray_local):
    from pipelines.train_data import text_windows

    text = "".join(chr(97 + i % 26) for i in range(5000))
    vocab = CharVocab.build(text)

    def rows(seed):
        ds = text_windows(text, vocab, 32, seed=seed)
        return np.concatenate([b["ids"] for b in ds.iter_batches(batch_format="numpy")])

    plain, a, b = rows(None), rows(1), rows(1)
    assert np.array_equal(plain[0, -1], plain[1, 0])  # text order: windows follow each other
    assert np.array_equal(a, b) and not np.array_equal(a, plain)  # seeded, deterministic
    assert sorted(map(tuple, a)) == sorted(map(tuple, plain))  # the same windows


@pytest.mark.parametrize("fits", [True, False])
def test_shard_cache_gives_each_row_once_an_epoch_in_full_batches(ray_local, fits):
    import ray.data

    ids = np.arange(1000 * 9).reshape(1000, 9)  # row i starts with 9 * i
    shard = ray.data.from_numpy(ids).rename_columns({"data": "ids"}).iterator()
    cache = ShardCache(shard, RNNTask(None), batch_size=64, buffer=200, seed=3, fits=fits)
    orders = []
    for epoch in range(2):
        batches = list(cache.epoch(epoch))
        assert all(b["ids"].shape == (64, 9) for b in batches)
        assert len(batches) == 1000 // 64  # the last, smaller batch is dropped
        first = torch.cat([b["ids"][:, 0] for b in batches]) // 9
        assert len(set(first.tolist())) == len(first)  # no row twice
        orders.append(first.tolist())
    assert orders[0] != orders[1]  # a new order every epoch
    assert orders[0][:20] != sorted(orders[0][:20])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_collectives(backend: str, device: torch.device) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)])
        model = build_model("cnn", spec).to(device)
        x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
        cache = [{"x": x[:32], "y": y[:32]}, {"x": x[32:], "y": y[32:]}]
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
        got = evaluate(CNNTask(spec), model, None, {"batch_size": 32}, device, autocast, cache)
        with torch.no_grad(), autocast:
            want = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
        assert got["val_accuracy"] == pytest.approx(want)
        assert all_sum(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
        assert past_deadline(time.time() - 1) and not past_deadline(None)
        rnn = build_model("rnn", RNNSpec(vocab=list("abcdef"))).to(device)
        ids = torch.randint(0, 7, (8, 17))
        got = evaluate(RNNTask(None), rnn, None, {"batch_size": 4}, device, autocast,
                       [{"ids": ids}])
        assert 0 < got["val_loss"] < 10
    finally:
        dist.destroy_process_group()


def test_validation_and_all_reduce_under_a_process_group():
    check_collectives("gloo", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_validation_and_all_reduce_under_nccl_on_a_gpu():
    # NCCL refuses CPU tensors: the sums must travel on the GPU.
    check_collectives("nccl", torch.device("cuda"))
