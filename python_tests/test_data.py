"""sparsekern.data: digits split and scaling, the (seed, epoch) batch order, CIFAR-10 read
from official-format batch files through torchvision, and the missing-files errors."""
import pickle

import numpy as np
import pytest
import torch
from run_helpers import _dump, one_thread, write_cifar  # noqa: F401  (fixture)

from sparsekern.data import CIFAR_FILES, load_cifar10, load_dataset, load_digits, random_crop_flip


def test_digits_split_is_stratified_deterministic_and_standardised():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_y, c.test_y)  # the seed draws the split
    assert torch.bincount(a.test_y).tolist() == torch.bincount(c.test_y).tolist()  # stratified
    assert abs(float(a.train_x.mean())) < 1e-5 and abs(float(a.train_x.std()) - 1) < 1e-3
    # Together the splits hold every image once: the labels' counts add up to the dataset's.
    from sklearn.datasets import load_digits as sk

    counts = torch.bincount(a.train_y) + torch.bincount(a.test_y)
    assert counts.tolist() == np.bincount(sk().target).tolist()


def test_batch_order_is_a_function_of_seed_and_epoch():
    d = load_digits(seed=0)
    first = [y for _, y in d.batches(100, seed=3, epoch=0)]
    again = [y for _, y in d.batches(100, seed=3, epoch=0)]
    other = [y for _, y in d.batches(100, seed=3, epoch=1)]
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert sorted(torch.cat(first).tolist()) == sorted(d.train_y.tolist())  # a permutation, last batch kept
    assert len(first) == d.num_batches(100) == 15
    assert len(list(d.batches(100, seed=3, epoch=0, max_batches=2))) == 2 == d.num_batches(100, 2)


def test_cifar_reads_official_format_files(tmp_path):
    folder = write_cifar(tmp_path, per_batch=6)
    raw = pickle.load(open(folder / "data_batch_2", "rb"), encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (6, 3072)
    d = load_dataset("cifar10", seed=0, data_dir=tmp_path)
    assert d.train_x.shape == (30, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (6, 3, 32, 32) and d.test_x.dtype == torch.float32
    # Image 0 of data_batch_2 is training image 6, channel-major as in the file.
    assert torch.equal(d.train_x[6].flatten(), torch.from_numpy(raw[b"data"][0]))
    assert d.train_y[6:12].tolist() == raw[b"labels"]
    x, y = next(d.batches(4, seed=0, epoch=0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    # The batch folder itself is accepted as --data-dir too.
    assert torch.equal(load_cifar10(folder).test_y, d.test_y)


def test_cifar_missing_folder_names_every_file_and_the_place(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", seed=0, data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert f"{tmp_path / 'nowhere' / 'cifar-10-batches-py'}/ does not exist" in msg
    assert all(f in msg for f in CIFAR_FILES)
    assert "cifar-10-python.tar.gz" in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("cifar10", seed=0, data_dir=None)


def test_cifar_missing_one_file_is_named(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in .*cifar-10-batches-py/: data_batch_4, batches.meta"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path)


def test_cifar_wrong_format_is_a_value_error(tmp_path):
    folder = write_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"something": 1}, f)
    with pytest.raises(ValueError, match="test_batch: not the CIFAR-10 python format"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path)
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="data_batch_2: not the CIFAR-10 python format"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path)


def test_cifar_batches_of_another_shape_empty_or_with_non_integer_labels_are_named(tmp_path):
    """Each of these reached the user as a message naming only the folder (rows of another
    size, a corrupt batches.meta), a traceback after the data loaded (an empty test_batch), or
    not at all (labels 1.5 truncated to 1)."""
    folder = write_cifar(tmp_path)
    _dump({b"labels": [1, 2], b"data": np.zeros((2, 100), np.uint8)}, folder / "data_batch_2")
    with pytest.raises(ValueError, match="data_batch_2: not the CIFAR-10 python format"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path)
    folder = write_cifar(tmp_path / "b")
    (folder / "batches.meta").write_bytes(b"junk")
    with pytest.raises(ValueError, match="batches.meta: not the CIFAR-10 python format"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path / "b")
    folder = write_cifar(tmp_path / "c")
    _dump({b"labels": [], b"data": np.zeros((0, 3072), np.uint8)}, folder / "test_batch")
    with pytest.raises(ValueError, match="no images in test_batch"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path / "c")
    folder = write_cifar(tmp_path / "d")
    _dump({b"labels": [1.5, 2.0], b"data": np.zeros((2, 3072), np.uint8)}, folder / "data_batch_1")
    with pytest.raises(ValueError, match="the labels of data_batch_1, .*data_batch_5 must be integers 0..9"):
        load_dataset("cifar10", seed=0, data_dir=tmp_path / "d")


def test_random_crop_flip_moves_pixels_within_the_padded_frame():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).to(torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    ones = torch.ones(1, 3, 32, 32, dtype=torch.uint8)
    # With pad 4, at most 4 rows and 4 columns of zeros come in from the border.
    zeros = (random_crop_flip(ones, torch.Generator().manual_seed(1)) == 0).sum()
    assert zeros <= 3 * (4 * 32 + 4 * 32)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="`data` must be one of"):
        load_dataset("mnist", seed=0)
