"""Labeling a tar of images the way a user writes it with plain PyTorch, without kiln: open
the tar, PIL-decode each member, batch, predict, write Parquet with top-k columns. The
baseline that bench/label.py runs next to `kiln label`, as a whole command.

The model is the Keras MNIST network (conv32-conv64-maxpool-dense128-dense) on grey images, or
He et al.'s CIFAR ResNet-20 (bench/plain/resnet.py's own) on colour ones, its weights read from
a model folder (config.json + weights.safetensors) with safetensors alone. Colour JPEGs are
decoded by Pillow at a reduced scale (draft mode) and resized bilinearly to the model's size.

    python bench/plain/label.py MODEL_DIR IMAGES.tar OUT.parquet [--batch 128] [--top-k 5]
Prints one JSON object on the last line of stdout."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from resnet import ResNet20  # bench/plain/resnet.py: a script's own folder is on sys.path
from safetensors.torch import load_file


class MnistNet(nn.Module):
    def __init__(self, classes: int, size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * ((size - 4) // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("tar")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()
    start = time.perf_counter()
    folder = args.model / "model" if (args.model / "model").is_dir() else args.model
    config = json.loads((folder / "config.json").read_text())["spec"]
    classes = np.asarray(config["classes"])
    size, channels = config.get("image_size", 28), config.get("channels", 1)
    weights = load_file(str(folder / "weights.safetensors"))
    if config["arch"] == "resnet20":
        model = ResNet20(len(classes))
        # the same network under other names: the stem is conv + bn here
        weights = {k.replace("stem.0.", "conv.").replace("stem.1.", "bn."): v
                   for k, v in weights.items()}
    else:
        model = MnistNet(len(classes), size)
    model.load_state_dict(weights)
    model.eval()
    mean = torch.tensor(config.get("mean", [0.5])).view(1, -1, 1, 1)
    std = torch.tensor(config.get("std", [0.5])).view(1, -1, 1, 1)
    mode = "L" if channels == 1 else "RGB"
    cols: dict[str, list] = {"path": [], "label": [], "confidence": [], "top_labels": [],
                             "top_scores": []}

    def predict(names, images):
        x = torch.from_numpy(np.stack(images)).float().div_(255).sub_(mean).div_(std)
        with torch.inference_mode():
            scores, idx = torch.softmax(model(x), 1).topk(args.top_k, 1)
        scores, idx = scores.numpy(), idx.numpy()
        cols["path"] += names
        cols["label"] += classes[idx[:, 0]].tolist()
        cols["confidence"] += scores[:, 0].tolist()
        cols["top_labels"] += classes[idx].tolist()
        cols["top_scores"] += scores.tolist()

    names, images = [], []
    with tarfile.open(args.tar) as tf:
        for member in tf:
            if not member.isfile():
                continue
            img = Image.open(io.BytesIO(tf.extractfile(member).read()))
            if img.format == "JPEG":
                img.draft(mode, (size, size))
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            names.append(member.name)
            arr = np.asarray(img)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))  # (C, S, S)
            if len(images) == args.batch:
                predict(names, images)
                names, images = [], []
    if images:
        predict(names, images)
    pq.write_table(pa.table(cols), args.out)
    print(json.dumps({"images": len(cols["path"]), "seconds": time.perf_counter() - start,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
