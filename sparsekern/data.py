"""The datasets `sparsekern train` knows, held in memory as tensors, and the batch order.

digits   scikit-learn's handwritten digits (1,797 8x8 greyscale images, ships with the
         package): a stratified 80/20 train/test split drawn with the run's seed, pixels
         scaled by 1/16 and standardised with the training split's mean and std; images are
         1x8x8 (models that want a vector flatten them themselves).
cifar10  CIFAR-10 from the user's own copy of the python-format batches, read through
         torchvision.datasets.CIFAR10(root, download=False); nothing is ever downloaded.
         Training batches get the usual augmentation (4-pixel zero-pad random crop,
         horizontal flip); both splits are normalised with the per-channel CIFAR-10 mean/std.

Batch order is a pure function of (seed, epoch): each epoch's permutation and
augmentation draws come from a torch.Generator seeded with both, so a resumed run sees
exactly the batches the uninterrupted run would have, and no loader state needs saving
beyond the epoch number.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

DATASETS = ("digits", "cifar10")

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Per-channel statistics of the CIFAR-10 training set (0..1 pixel scale).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """A classification dataset in memory. `train_x`/`test_x` are float32 [N, C, H, W]
    ready for the model, except that CIFAR's training images stay uint8 so that the
    augmentation can crop and flip them per batch (see `batches`)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.test_x.shape[1:])

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → normalised float32 (CIFAR); float images pass through."""
        if x.dtype != torch.uint8:
            return x
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float().div_(255.0) - mean) / std

    def batches(self, batch_size: int, *, seed: int, epoch: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for one epoch, shuffled (and augmented) by a generator seeded
        with (seed, epoch) only. The last, smaller batch is kept."""
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(len(self.train_y), generator=gen)
        n = len(order) if max_batches is None else min(len(order), max_batches * batch_size)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = self.train_x[idx]
            if self.augment:
                x = random_crop_flip(x, gen)
            yield self._prepare(x), self.train_y[idx]

    def num_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        n = -(-len(self.train_y) // batch_size)
        return n if max_batches is None else min(n, max_batches)

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.test_y), batch_size):
            yield self._prepare(self.test_x[start:start + batch_size]), self.test_y[start:start + batch_size]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self._prepare(self.test_x[:1]).expand(batch, *self.input_shape).contiguous()


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (run seed, epoch), so epochs draw independent orders."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a uint8 batch: zero-pad by `pad`, crop back to
    the original size at a random offset, flip horizontally with probability 1/2."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return out.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))


def load_digits(seed: int, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    to_images = lambda a: torch.from_numpy((a - mean) / std).reshape(-1, 1, 8, 8).contiguous()  # noqa: E731
    return Dataset("digits", to_images(x_tr), torch.from_numpy(y_tr), to_images(x_te), torch.from_numpy(y_te), num_classes=10)


def cifar_root(data_dir: str | os.PathLike | None) -> Path:
    """The folder that holds cifar-10-batches-py/ (given it, or the batch folder itself),
    or a FileNotFoundError that says which files to put where."""
    if data_dir is None:
        raise FileNotFoundError(
            f"--data cifar10 needs --data-dir: a folder holding {CIFAR_FOLDER}/ with "
            f"{', '.join(CIFAR_FILES)} (extract {CIFAR_URL} there; sparsekern never downloads)"
        )
    root = Path(data_dir).expanduser()
    if root.name == CIFAR_FOLDER and not (root / CIFAR_FOLDER).is_dir():
        root = root.parent
    folder = root / CIFAR_FOLDER
    missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        where = f"{folder}/ does not exist" if not folder.is_dir() else f"missing in {folder}/: {', '.join(missing)}"
        raise FileNotFoundError(
            f"CIFAR-10 not found ({where}). Put the python-format batches "
            f"{', '.join(CIFAR_FILES)} in {folder}/ — extracting {CIFAR_URL} into {root}/ "
            f"creates exactly that; sparsekern never downloads."
        )
    return root


def _cifar_class():
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's reader without its md5 checks: the files' format is validated
        below instead, so a subset written in the same format (tests, smoke runs) loads
        too. Presence was checked by cifar_root."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return LocalCIFAR10


def _unreadable_file(folder: Path, files: list) -> Path | None:
    """The first batch file that does not unpickle to a dict with "data" (rows of 3,072
    bytes) and "labels" (only on the error path: torchvision's reader does not say which
    file failed)."""
    for name, _ in files:
        try:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if not (isinstance(entry, dict) and "data" in entry and ("labels" in entry or "fine_labels" in entry)):
                return folder / name
            # A batch of another image size: torchvision's concatenation failed naming no file.
            if np.ndim(entry["data"]) != 2 or np.shape(entry["data"])[1] != 3 * 32 * 32:
                return folder / name
        except Exception:  # any failure to read it names this file
            return folder / name
    return None


def _unreadable_meta(path: Path) -> Path | None:
    """`path` (batches.meta) unless it unpickles to a dict with "label_names": a corrupt
    one was blamed on the whole folder."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        return None if isinstance(entry, dict) and "label_names" in entry else path
    except Exception:  # any failure to read it names this file
        return path


def load_cifar10(data_dir) -> Dataset:
    root = cifar_root(data_dir)
    cls = _cifar_class()
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            folder = root / CIFAR_FOLDER
            where = (_unreadable_file(folder, cls.train_list + cls.test_list)
                     or _unreadable_meta(folder / cls.meta["filename"]) or folder)
            raise ValueError(f"{where}: not the CIFAR-10 python format ({type(e).__name__}: {e})") from e
        names = ", ".join(name for name, _ in (cls.train_list if train else cls.test_list))
        if len(ds.data) == 0:
            # The run died later with a traceback from a shape error (an empty test split:
            # while building the example input).
            raise ValueError(f"{root / CIFAR_FOLDER}: no images in {names}")
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # HWC → CHW, uint8
        # Non-integer labels (1.5) were truncated to integers without a word.
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ds.targets):
            raise ValueError(f"{root / CIFAR_FOLDER}: the labels of {names} must be integers 0..9")
        y = torch.tensor(ds.targets, dtype=torch.int64)
        if len(y) != len(x) or (len(y) and not (0 <= int(y.min()) and int(y.max()) < 10)):
            raise ValueError(f"{root / CIFAR_FOLDER}: labels must be 0..9, one per image")
        splits.append((x, y))
    (tr_x, tr_y), (te_x, te_y) = splits
    ds = Dataset("cifar10", tr_x, tr_y, te_x, te_y, num_classes=10, augment=True, mean=CIFAR_MEAN, std=CIFAR_STD)
    ds.test_x = ds._prepare(te_x)  # the test split is never augmented: normalise it once
    return ds


def load_dataset(name: str, *, seed: int, data_dir=None) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"`data` must be one of {list(DATASETS)}, got {name!r}")
