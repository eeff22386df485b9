"""What a training worker is fed: shuffled training rows (a class-per-folder archive is stored
in order), each worker's share of the global batch, text streams read chunk after chunk with the
state carried, and validation and the all-reduces under a real process group (gloo here; NCCL
on a GPU)."""

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from kiln.models import build_model
from kiln.models.checkpoint import CNNSpec, RNNSpec
from kiln.pipelines.train_data import HeldShard
from kiln.train.batches import ImageBatches, TextStreams, ValBatches
from kiln.train.loop import agree, all_sum
from kiln.train.tasks import CNNTask, Feed, RNNTask, Schedule, WorkerConfig


def test_image_training_rows_are_shuffled_across_classes(ray_local, digits_data, tmp_path):
    from kiln import embedded
    from kiln.pipelines.train_data import image_dataset
    from kiln.pipelines.transforms import ImagePreset

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


def test_labeled_images_from_a_directory_and_from_a_sharded_set(ray_local, digits_data,
                                                                tmp_path):
    """A directory's classes are its folders (their files listed by the tasks); a sharded set
    of tars learns its classes as it is read."""
    from kiln import embedded
    from kiln.pipelines import sources
    from kiln.pipelines.train_data import check_image_source, image_dataset
    from kiln.pipelines.transforms import ImagePreset

    pngs, labels = digits_data
    root = tmp_path / "classes"
    for i in range(40):
        (root / labels[i]).mkdir(parents=True, exist_ok=True)
        (root / labels[i] / f"{i:03d}.png").write_bytes(pngs[i])
    units, known = check_image_source(str(root))
    assert {u.kind for u in units} == {"folder"} and known == 40
    data = image_dataset(str(root), ImagePreset(), 0.25, seed=0)
    got = [r["label"] for ds in (data.train, data.val) for r in ds.take_all()]
    assert sorted(got) == sorted(labels[:40])
    with pytest.raises(ValueError, match="no class folders"):
        check_image_source(str(root / labels[0]))  # its files, in no class folder
    for s in range(sources.SHARDED_TARS):
        embedded.write_class_tar(tmp_path / f"shard-{s:02d}.tar", pngs[s * 5:(s + 1) * 5],
                                 labels[s * 5:(s + 1) * 5])
    units, known = check_image_source(str(tmp_path / "shard-*.tar"))
    assert {u.kind for u in units} == {"tarshard"} and known is None


def test_text_streams_cut_the_text_into_contiguous_stretches(ray_local):
    from kiln.pipelines.train_data import text_streams

    ids = np.arange(1000, dtype=np.int64)
    rows = list(text_streams(ids, 6).iter_rows())
    length = 999 // 6
    assert [r["stream"] for r in rows] == list(range(6))
    for r in rows:  # stream i: ids i*L .. (i+1)*L, one more than L for the last target
        i = r["stream"]
        assert np.array_equal(r["ids"], ids[i * length : (i + 1) * length + 1])


def worker_cfg(kind="rnn", batch=64, **feed) -> WorkerConfig:
    return WorkerConfig(kind=kind, spec={}, out="", data="", seed=3, feed=Feed(**feed),
                        schedule=Schedule(batch=batch, lr=1e-3, optimizer="adamw",
                                          cooldown=1.0, epochs=None, max_steps=None,
                                          time_limit_s=None))


class Rows:  # the task side of ImageBatches: numpy rows -> tensors
    def collate(self, batch):
        return {"x": torch.from_numpy(batch["x"].copy()), "y": torch.from_numpy(
            batch["y"].copy())}


def image_rows(n):
    import ray.data

    return ray.data.from_items([{"x": np.full((1, 2, 2), i % 251, np.uint8), "y": i}
                                for i in range(n)])


def test_workers_holding_the_whole_set_split_each_global_batch(ray_local):
    held = HeldShard.of(image_rows(1000).repartition(7).materialize())  # as make_trainer does
    cfg = worker_cfg(batch=64, whole_train=True, train_rows=1000)
    loaders = [ImageBatches(held.for_worker(rank, 2), Rows(), cfg, rank, 2) for rank in (0, 1)]
    orders = []
    for epoch in range(2):
        per_rank = [list(w.epoch(epoch)) for w in loaders]
        assert [len(b) for b in per_rank] == [1000 // 64] * 2 == [w.steps_per_epoch
                                                                   for w in loaders]
        assert all(b["y"].shape == (32,) for bs in per_rank for b in bs)  # 64 / 2 workers
        seen = torch.cat([torch.cat([a["y"], b["y"]]) for a, b in zip(*per_rank, strict=True)])
        assert len(set(seen.tolist())) == len(seen) == (1000 // 64) * 64  # no row twice
        orders.append(seen.tolist())
    assert orders[0] != orders[1]  # a new permutation every epoch
    assert orders[0][:20] != sorted(orders[0][:20])


def test_a_held_split_gives_each_worker_every_wth_row_and_all_rows_once(ray_local):
    held = HeldShard.of(image_rows(1001).repartition(5).materialize(), split=True)
    blocks = [b["y"].tolist() for b in held.iter_batches()]  # the whole set, block by block
    assert len(blocks) == 5
    ys = []
    for rank in (0, 1, 2):
        batches = list(held.for_worker(rank, 3).iter_torch_batches(64, Rows().collate))
        assert [len(b["y"]) for b in batches[:-1]] == [64] * (len(batches) - 1)  # across blocks
        ys.append(torch.cat([b["y"] for b in batches]).tolist())
        assert ys[-1] == [y for b in blocks for y in b[rank::3]]  # every 3rd row of each block
    assert sorted(sum(ys, [])) == list(range(1001))  # every row, once
    assert max(map(len, ys)) - min(map(len, ys)) <= 5  # at most a row a block apart
    whole = HeldShard.of(image_rows(50).materialize())  # not split: every worker reads all
    assert sum(len(b["y"]) for b in whole.for_worker(1, 3).iter_batches()) == 50


def test_a_worker_streaming_its_split_gets_full_batches_each_row_once(ray_local):
    shard = image_rows(1000).iterator()
    cfg = worker_cfg(batch=64, whole_train=False, train_rows=1000)
    loader = ImageBatches(shard, Rows(), cfg, 0, 1)
    batches = list(loader.epoch(0))
    assert len(batches) == 1000 // 64 == loader.steps_per_epoch
    ys = torch.cat([b["y"] for b in batches]).tolist()
    assert len(set(ys)) == len(ys) and ys[:20] != sorted(ys[:20])


def test_text_streams_are_split_by_worker_and_read_chunk_after_chunk(ray_local):
    from kiln.pipelines.train_data import text_streams

    ids = np.arange(10_001, dtype=np.int64)
    ds = text_streams(ids, 4)  # 4 streams of 2,500
    got = []
    for rank in (0, 1):
        loader = TextStreams(HeldShard.of(ds).for_worker(rank, 2), 100, rank, 2, seed=1)
        chunks = list(loader.epoch(0))
        assert len(chunks) == loader.steps_per_epoch == (2501 - 100) // 100
        assert chunks[0]["first"] and not any(c["first"] for c in chunks[1:])
        for a, b in zip(chunks, chunks[1:], strict=False):
            # each chunk takes up where the last one's inputs ended: the state can carry
            assert torch.equal(b["ids"][:, 0], a["ids"][:, -1])
        got.append(torch.cat([c["ids"][:, 0] for c in chunks]) // 2500)
    assert set(got[0].tolist()) == {0, 2} and set(got[1].tolist()) == {1, 3}  # by stream % W


def test_the_char_rnn_carries_its_state_from_chunk_to_chunk():
    from kiln.models import CharRNN

    torch.manual_seed(0)
    model = CharRNN(11, "lstm", 8, 16, 2).eval()
    task = RNNTask(None, worker_cfg())
    ids = torch.randint(0, 11, (3, 41))  # 3 streams, two chunks of 20
    task.begin_epoch()
    first, _ = task.loss(model, {"ids": ids[:, :21], "first": True})
    second, _ = task.loss(model, {"ids": ids[:, 20:], "first": False})
    with torch.no_grad():  # the same 40 characters in one pass
        logits, _ = model(ids[:, :-1])
        whole = torch.nn.functional.cross_entropy(logits[:, 20:].reshape(-1, 11),
                                                  ids[:, 21:].reshape(-1))
        fresh, _ = model(ids[:, 20:-1])  # the second chunk from a zero state
        reset = torch.nn.functional.cross_entropy(fresh.reshape(-1, 11), ids[:, 21:].reshape(-1))
    assert second.item() == pytest.approx(whole.item(), rel=1e-5)
    assert abs(reset.item() - whole.item()) > 1e-4  # the check above can tell the difference
    task.loss(model, {"ids": ids[:, :21], "first": True})  # a new epoch starts from zero
    assert torch.equal(task.loss(model, {"ids": ids[:, :21], "first": True})[0], first)


def check_collectives(backend: str, device: torch.device, init_method: str, rank: int = 0,
                      world_size: int = 1) -> None:
    """One rank's part: validation and the all-reduces with every rank holding its own share
    of the data; what each rank ends up with must be what the union of the shares gives."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # every rank: the same model (as DDP keeps it), the same union
        spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)], mean=[0.2],
                       std=[0.3])
        model = build_model("cnn", spec).to(device).eval()
        n = 64
        x, y = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10,
                                                                                       (n,))
        # Uneven, interleaved shares (on 2 ranks: a third and two thirds), so that a mean of
        # the ranks' means or one rank's own figures would not pass for the union's.
        owner = torch.clamp(torch.arange(n) % (world_size + 1), max=world_size - 1)
        mx, my = x[owner == rank], y[owner == rank]
        val = ValBatches(lambda: iter([{"x": mx[i : i + 16], "y": my[i : i + 16]}
                                       for i in range(0, len(my), 16)]), cache=True)
        val.load()
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
        task = CNNTask(spec, worker_cfg(kind="cnn"))
        own = task.val_sums(model, val, device, torch.preserve_format, autocast).tolist()
        sums = all_sum(torch.tensor(own, dtype=torch.float64))
        got = task.metrics(sums)
        with torch.no_grad(), autocast:
            normalized = (x.float() / 255 - 0.2) / 0.3
            logits = model(normalized.to(device)).float().cpu()
        want = {"val_accuracy": (logits.argmax(1) == y).float().mean().item(),
                "val_loss": torch.nn.functional.cross_entropy(logits, y).item()}
        rel = 1e-5 if device.type == "cpu" else 1e-2  # bf16 autocast on a GPU
        assert sums[2] == n  # every image counted once, on every rank
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"])
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=rel)
        if world_size > 1:  # the check above can tell the union from this rank's share
            assert own[2] < n
            assert task.metrics(own)["val_loss"] != pytest.approx(want["val_loss"], rel=rel)

        ranks = range(world_size)
        assert all_sum(torch.tensor([rank + 1.5, 10.0 * (rank + 1)])) == [
            sum(r + 1.5 for r in ranks), sum(10.0 * (r + 1) for r in ranks)]
        # The smallest estimate of the total steps, and any one rank's lateness, win.
        assert agree(123.0 + 7 * rank, rank == world_size - 1) == (123.0, True)
        assert agree(50.0 + rank, False) == (50.0, False)
        assert agree(float("inf") if rank == 0 else 80.0 + rank, False) == (
            float("inf") if world_size == 1 else 81.0, False)

        # A small char-RNN: validation runs 1,000 characters per pass, the state carried.
        rnn = build_model("rnn", RNNSpec(vocab=list("abcdef"), embed=16, hidden=32)).to(
            device).eval()
        union = torch.randint(0, 7, (3, 1201))  # 3 streams (2 + 1 on 2 ranks), two passes each
        streams = TextStreams(None, 1000, rank, world_size, seed=0)
        streams.ids = union[rank::world_size]  # stream % W == rank, as load() picks them
        rnn_task = RNNTask(None, worker_cfg())
        own = rnn_task.val_sums(rnn, streams, device, None, autocast).tolist()
        sums = all_sum(torch.tensor(own, dtype=torch.float64))
        assert sums[1] == 3 * 1200  # every character of every stream but the first is scored
        with torch.no_grad():
            logits, _ = rnn(union[:, :-1].to(device))
            whole = torch.nn.functional.cross_entropy(logits.reshape(-1, 7).float().cpu(),
                                                      union[:, 1:].reshape(-1)).item()
        assert rnn_task.metrics(sums)["val_loss"] == pytest.approx(whole, rel=1e-4)
        if world_size > 1:
            assert rnn_task.metrics(own)["val_loss"] != pytest.approx(whole, rel=1e-4)
    finally:
        dist.destroy_process_group()


def collectives_rank(rank: int, world_size: int, init_method: str) -> None:
    """A spawned gloo rank (torch.multiprocessing.spawn passes the rank first)."""
    torch.set_num_threads(1)
    check_collectives("gloo", torch.device("cpu"), init_method, rank, world_size)


def test_validation_and_all_reduce_under_a_process_group(tmp_path):
    """Two processes, each with its own data: a sum over one rank would be the identity."""
    torch.multiprocessing.spawn(collectives_rank, args=(2, f"file://{tmp_path / 'pg'}"),
                                nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_validation_and_all_reduce_under_nccl_on_a_gpu(tmp_path):
    # NCCL refuses CPU tensors: the sums must travel on the GPU.
    check_collectives("nccl", torch.device("cuda"), f"file://{tmp_path / 'pg'}")
