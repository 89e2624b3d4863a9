"""What the CLI / training / report tests share: CIFAR-10 batch files in the official format
(tiny), a one-thread fixture, the files every finished run folder holds, and
BatchNorm statistics for the purge tests. Not a test
module (pytest collects test_*.py only)."""
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

RUN_FILES = ["config.json", "log.txt", "checkpoint.pt", "report.json", "report.md", "density_layers.png",
             "training.png", "exported_state_dict.pt", "exported_model.pt2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it single-threaded: the models are tiny, and on a
    shared 2-core machine intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Py2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's str opcodes, as the official CIFAR-10 pickles (made by
    Python 2) do: pickle.load(f, encoding="bytes") gives b"data" / b"labels" keys,
    encoding="latin1" (torchvision's reader) gives "data" / "labels"."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def write_cifar(root: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ with data_batch_1..5, test_batch (per_batch random images
    each: b"data" uint8 N×3072 in CHW order, b"labels") and batches.meta. Returns the folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump({b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
               b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
               b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}, folder / name)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, folder / "batches.meta")
    return folder


@torch.no_grad()
def tame_batchnorm(model):
    """Random BatchNorm statistics of unit scale: no channel trivially zero, no blow-up."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.3)
    return model


@torch.no_grad()
def close_random_gates(method, fraction: float):
    """Closes about `fraction` of every hard-concrete layer's gates (log α = −20: every
    sample and the median gate 0), drawn with torch's generator."""
    for _, layer in method.layers:
        log_alpha = layer.weight_log_alpha
        log_alpha[torch.rand(log_alpha.shape) < fraction] = -20.0
