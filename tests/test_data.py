"""onebit.data: upstream formats, lookup order, downloads (never the network), corruption, batching."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import onebit
from onebit import data as D
from onebit.data import (
    DATASETS,
    ArrayDataset,
    Augment,
    BatchLoader,
    dataset_info,
    load_dataset,
    read_idx,
    split_validation,
    to_float,
)
from onebit.errors import DataError, FileWriteError, OnebitError, UnknownNameError

from datafixtures import (
    idx_bytes,
    make_cifar10,
    make_cifar100,
    make_idx_dataset,
    make_svhn,
    mat_bytes,
    memory_bound,
    py2_pickle,
    write_idx,
)


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real data folders, a private cache, and a network that always fails."""
    monkeypatch.delenv("ONEBIT_DATA", raising=False)
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", [tmp_path / "system"])
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return calls


def serve(monkeypatch, payloads: dict[str, bytes]) -> list[str]:
    """Make urlopen answer each URL's file name with the given bytes; returns the URLs asked for."""
    calls = []

    def fake(url, *args, **kwargs):
        calls.append(url)
        return io.BytesIO(payloads[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return calls


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# --------------------------------------------------------------------------- registry, digits, info
def test_registry_lists_every_dataset_with_a_description():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"} <= set(DATASETS.names())
    for name in DATASETS.names():
        assert DATASETS.describe(name)
        info = dataset_info(name)
        assert len(info["input_shape"]) == 3 and info["num_classes"] >= 10
        assert DATASETS.get(name).info["input_shape"] == info["input_shape"]
    assert dataset_info("cifar10")["input_shape"] == (3, 32, 32)
    assert dataset_info("fashion_mnist")["classes"][0] == "T-shirt/top"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet_tiny", "train")
    assert "digits" in str(err.value) and "fashion_mnist" in str(err.value)


def test_unknown_split_is_a_onebit_error():
    with pytest.raises(OnebitError, match="valid: train, test"):
        load_dataset("digits", "validation")


def test_digits_split_is_deterministic_stratified_and_in_range():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and 350 <= len(test) <= 370
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (1, 8, 8)
        assert ds.labels.dtype == np.int64 and ds.max_value == 16 and ds.images.max() <= 16
        assert set(np.unique(ds.labels)) == set(range(10))
    np.testing.assert_array_equal(load_dataset("digits", "test").images, test.images)
    x = to_float(test.images, test.max_value)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0


def test_to_float_maps_range_to_minus_one_one():
    x = to_float(np.array([[0, 51, 255]], dtype=np.uint8), 255)
    torch.testing.assert_close(x, torch.tensor([[-1.0, -0.6, 1.0]]))
    torch.testing.assert_close(to_float(torch.tensor([0, 8, 16], dtype=torch.uint8), 16), torch.tensor([-1.0, 0.0, 1.0]))


def test_array_dataset_validates_shapes():
    good = np.zeros((3, 1, 4, 4), np.uint8)
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(good.astype(np.float32), np.zeros(3, np.int64), ["a", "b"], "t")
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ArrayDataset(good, np.zeros(2, np.int64), ["a", "b"], "t")
    with pytest.raises(DataError, match="labels must lie"):
        ArrayDataset(good, np.array([0, 1, 2]), ["a", "b"], "t")
    ds = ArrayDataset(good, np.array([0, 1, 1], np.uint8), ["a", "b"], "t")
    assert ds.labels.dtype == np.int64 and ds.input_shape == (1, 4, 4) and ds.num_classes == 2


# --------------------------------------------------------------------------- idx formats and lookup
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip(tmp_path, gz, name):
    arrays = make_idx_dataset(tmp_path / "d", gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(name, split, data_dir=tmp_path / "d")
        images, labels = arrays[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(images), 1, 28, 28)
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.images[:, 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.max_value == 255 and ds.classes == list(dataset_info(name)["classes"])


@pytest.mark.parametrize("sub", ["mnist", "MNIST/raw"])
def test_nested_folders_under_data_dir(tmp_path, sub):
    arrays = make_idx_dataset(tmp_path / "root" / sub, n_train=4)
    assert len(load_dataset("mnist", "train", data_dir=tmp_path / "root")) == 4
    np.testing.assert_array_equal(load_dataset("mnist", "test", data_dir=tmp_path / "root").labels, arrays["test"][1])


def test_hyphenated_folder_under_onebit_data(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "shared" / "fashion-mnist", n_train=6)
    monkeypatch.setenv("ONEBIT_DATA", os.pathsep.join([str(tmp_path / "nothing"), str(tmp_path / "shared")]))
    assert len(load_dataset("fashion_mnist", "train")) == 6


def test_lookup_order(tmp_path, monkeypatch):
    # the training-set size tells which copy was read
    make_idx_dataset(tmp_path / "given", n_train=2)
    make_idx_dataset(tmp_path / "env" / "mnist", n_train=3)
    make_idx_dataset(tmp_path / "system" / "mnist", n_train=4)
    make_idx_dataset(tmp_path / "cache" / "mnist", n_train=5)
    monkeypatch.setenv("ONEBIT_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", "train", data_dir=tmp_path / "given")) == 2
    assert len(load_dataset("mnist", "train", data_dir=tmp_path / "missing")) == 3
    monkeypatch.delenv("ONEBIT_DATA")
    assert len(load_dataset("mnist", "train")) == 4
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", [])
    assert len(load_dataset("mnist", "train")) == 5


def test_a_folder_needs_both_files_of_a_split(tmp_path):
    make_idx_dataset(tmp_path / "a", n_train=2)
    (tmp_path / "a" / "train-labels-idx1-ubyte.gz").unlink()
    make_idx_dataset(tmp_path / "a" / "mnist", n_train=3)
    assert len(load_dataset("mnist", "train", data_dir=tmp_path / "a")) == 3


def test_missing_files_offline_names_files_and_folders(tmp_path, isolated):
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", "test", data_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "cache" / "fashion_mnist") in message
    assert "download failed" in message and "network disabled" in message
    assert isolated and "fashion-mnist.s3" in isolated[0]
    assert files_under(tmp_path / "cache") == []


def test_download_off_does_not_touch_the_network(tmp_path, isolated):
    with pytest.raises(DataError, match="downloading is off"):
        load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    assert isolated == []


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "src", n_train=3, n_test=2)
    payloads = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    remotes = [D.Remote(r.filename, r.url, (hashlib.md5(payloads[r.filename]).hexdigest(),), (), r.splits)
               for r in D.REMOTES["mnist"]]
    monkeypatch.setitem(D.REMOTES, "mnist", remotes)
    calls = serve(monkeypatch, payloads)
    ds = load_dataset("mnist", "test")
    assert len(ds) == 2 and all("ossci-datasets" in url for url in calls) and len(calls) == 2
    cached = sorted(p.name for p in files_under(tmp_path / "cache"))
    assert cached == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert len(load_dataset("mnist", "test")) == 2 and len(calls) == 2  # served from the cache now


def test_checksum_mismatch_on_download_keeps_nothing(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "src", n_train=3, n_test=2)
    payloads = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    serve(monkeypatch, payloads)
    with pytest.raises(DataError, match="checksum mismatch for t10k-images-idx3-ubyte.gz") as err:
        load_dataset("fashion_mnist", "test")
    assert "\n" not in str(err.value)
    assert files_under(tmp_path / "cache") == []


def test_download_write_failure_is_reported_as_such(tmp_path, monkeypatch):
    """A FileWriteError (an OSError) while saving a download was reported as "download failed"."""
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "file" / "cache"))  # under a file: mkdir fails, even as root
    serve(monkeypatch, {r.filename: b"x" for r in D.REMOTES["mnist"]})
    with pytest.raises(FileWriteError, match="cannot write") as err:
        load_dataset("mnist", "test")
    assert "download failed" not in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- MNIST and Fashion-MNIST apart
FASHION_TEST_HEAD = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
MNIST_TRAIN_HEAD = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def _idx_with_labels(directory: Path, split: str, labels: list[int]) -> None:
    prefix = "train" if split == "train" else "t10k"
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", np.zeros((len(labels), 28, 28), np.uint8))
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels, np.uint8))


@pytest.mark.parametrize("download", [False, True])
def test_fashion_mnist_files_are_not_loaded_as_mnist(tmp_path, download):
    """The two share file names and every bare root is searched for both: data_dir=<a Fashion-MNIST
    folder> silently loaded Fashion-MNIST as "mnist"."""
    d = tmp_path / "fashion"
    _idx_with_labels(d, "test", FASHION_TEST_HEAD + [0, 1])
    with pytest.raises(DataError, match="these are Fashion-MNIST labels, not MNIST") as err:
        load_dataset("mnist", "test", data_dir=d, download=download)
    message = str(err.value)
    assert "\n" not in message and str(d / "t10k-labels-idx1-ubyte.gz") in message
    assert ("download failed" if download else "downloading is off") in message
    assert load_dataset("fashion_mnist", "test", data_dir=d).labels.tolist()[:10] == FASHION_TEST_HEAD
    # the refused root is skipped, not fatal: a real copy further on is found
    make_idx_dataset(d / "mnist", n_test=3)
    assert len(load_dataset("mnist", "test", data_dir=d)) == 3


def test_mnist_files_are_not_loaded_as_fashion_mnist(tmp_path):
    _idx_with_labels(tmp_path, "train", MNIST_TRAIN_HEAD)
    with pytest.raises(DataError, match="these are MNIST labels, not Fashion-MNIST"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path, download=False)
    assert len(load_dataset("mnist", "train", data_dir=tmp_path)) == 10
    # other labels (fixtures, relabelled copies) and files too short to tell are not refused
    _idx_with_labels(tmp_path, "train", MNIST_TRAIN_HEAD[:9])
    assert len(load_dataset("fashion_mnist", "train", data_dir=tmp_path)) == 9
    _idx_with_labels(tmp_path, "train", [1] + MNIST_TRAIN_HEAD[1:])
    assert len(load_dataset("fashion_mnist", "train", data_dir=tmp_path)) == 10


def test_real_fashion_mnist_is_refused_as_mnist(real_data_dir, isolated):
    folder = real_data_dir / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip(f"{folder} does not exist")
    for split in ("train", "test"):
        with pytest.raises(DataError, match="these are Fashion-MNIST labels, not MNIST"):
            load_dataset("mnist", split, data_dir=folder, download=False)
    assert isolated == []


# --------------------------------------------------------------------------- idx corruption
def _mnist_dir(tmp_path, gz=True):
    make_idx_dataset(tmp_path / "m", n_train=6, n_test=3, gz=gz)
    return tmp_path / "m"


def test_truncated_raw_file(tmp_path):
    d = _mnist_dir(tmp_path, gz=False)
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", "train", data_dir=d)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_trailing_garbage(tmp_path, gz):
    d = tmp_path / "m"
    make_idx_dataset(d, gz=gz)
    images = np.zeros((6, 28, 28), np.uint8)
    data = idx_bytes(images) + b"garbage"
    target = d / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    target.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="trailing data"):
        load_dataset("mnist", "train", data_dir=d)


def test_bytes_after_the_gzip_stream(tmp_path):
    d = _mnist_dir(tmp_path)
    path = d / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes() + b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        load_dataset("mnist", "train", data_dir=d)


def test_truncated_gzip(tmp_path):
    d = _mnist_dir(tmp_path)
    path = d / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="gzip") as err:
        load_dataset("mnist", "train", data_dir=d)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("offset", [0.3, 0.6, -6])  # deflate blocks and the CRC trailer
def test_bit_flipped_gzip(tmp_path, offset):
    d = tmp_path / "m"
    rng = np.random.default_rng(1)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 4, (50, 28, 28), dtype=np.uint8))
    write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 50, dtype=np.uint8))
    path = d / "train-images-idx3-ubyte.gz"
    blob = bytearray(path.read_bytes())
    i = int(len(blob) * offset) if offset > 0 else len(blob) + offset
    blob[i] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="gzip|truncated|trailing|magic"):
        load_dataset("mnist", "train", data_dir=d)


def test_wrong_magic(tmp_path):
    d = _mnist_dir(tmp_path, gz=False)
    # a labels file where images belong
    (d / "train-images-idx3-ubyte").write_bytes((d / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="magic 0x00000801, expected 0x00000803"):
        load_dataset("mnist", "train", data_dir=d)
    # gzip data under a raw name, and a non-byte element type
    (d / "train-images-idx3-ubyte").write_bytes(gzip.compress(idx_bytes(np.zeros((6, 28, 28)))))
    with pytest.raises(DataError, match="gzip data in a file not named .gz"):
        load_dataset("mnist", "train", data_dir=d)
    raw = bytearray(idx_bytes(np.zeros((6, 28, 28))))
    raw[2] = 0x0D
    (d / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="element type 0x0d"):
        load_dataset("mnist", "train", data_dir=d)


def test_huge_declared_size_is_not_allocated(tmp_path):
    path = tmp_path / "big-idx3"
    path.write_bytes(bytes([0, 0, 8, 3]) + (0xFFFFFFFF).to_bytes(4, "big") * 3 + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, 3)
    path.write_bytes(bytes([0, 0, 8]))
    with pytest.raises(DataError, match="too short"):
        read_idx(path, 3)


def test_label_range_count_and_image_size(tmp_path):
    d = _mnist_dir(tmp_path)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 10], np.uint8))
    with pytest.raises(DataError, match="label 10 out of range"):
        load_dataset("mnist", "train", data_dir=d)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        load_dataset("mnist", "train", data_dir=d)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(6, np.uint8))
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((6, 27, 28), np.uint8))
    with pytest.raises(DataError, match="27×28"):
        load_dataset("mnist", "train", data_dir=d)


# --------------------------------------------------------------------------- CIFAR
def test_fixture_pickles_look_like_upstream():
    blob = py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [3]})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob and b"_codecs" not in blob


@pytest.mark.parametrize("packed", [True, False])
def test_cifar10_round_trip(tmp_path, packed):
    _, arrays = make_cifar10(tmp_path / "c", packed=packed)
    for split, n in (("train", 20), ("test", 3)):
        ds = load_dataset("cifar10", split, data_dir=tmp_path / "c")
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.images, arrays[split][0])
        np.testing.assert_array_equal(ds.labels, arrays[split][1])
        assert ds.classes[0] == "airplane" and ds.num_classes == 10


def test_cifar10_extracted_folder_given_directly(tmp_path):
    path, arrays = make_cifar10(tmp_path, packed=False)
    ds = load_dataset("cifar10", "test", data_dir=path)
    np.testing.assert_array_equal(ds.labels, arrays["test"][1])


@pytest.mark.parametrize("packed", [True, False])
def test_cifar100_fine_and_coarse(tmp_path, packed):
    _, arrays = make_cifar100(tmp_path / "c", packed=packed)
    fine = load_dataset("cifar100", "train", data_dir=tmp_path / "c")
    coarse = load_dataset("cifar100", "test", data_dir=tmp_path / "c", label_mode="coarse")
    np.testing.assert_array_equal(fine.images, arrays["train"][0])
    np.testing.assert_array_equal(fine.labels, arrays["train"][1])
    np.testing.assert_array_equal(coarse.labels, arrays["test"][2])
    assert fine.num_classes == 100 and coarse.num_classes == 20 and coarse.classes[3] == "coarse3"
    with pytest.raises(DataError, match="label_mode"):
        load_dataset("cifar100", "test", data_dir=tmp_path / "c", label_mode="medium")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').system('false')",)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("member", ["test_batch", "batches.meta"])
def test_malicious_pickle_is_refused_without_running(tmp_path, packed, member):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=4)
    make_cifar10(tmp_path / "c", packed=packed, overrides={member: evil})
    with pytest.raises(DataError, match="refusing to load global (posix|os|nt).system") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path / "c")
    assert member in str(err.value)
    assert not marker.exists()


def test_pickle_without_numpy_arrays_or_with_other_globals(tmp_path):
    for payload, expected in [
        (pickle.dumps({b"data": _EvalEvil(), b"labels": [1]}), "refusing to load global builtins.eval"),
        (py2_pickle({"data": np.zeros((1, 3072), np.float32), "labels": [1]}), "uint8 array N×3072"),
        (py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [1, 2]}), "1 images but 2 labels"),
        (py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}), "labels must lie"),
        (py2_pickle(["not", "a", "dict"]), "top level is list"),
        (b"\x80\x02}q\x00(", "not a valid CIFAR pickle"),
    ]:
        make_cifar10(tmp_path / "c", packed=False, overrides={"test_batch": payload})
        with pytest.raises(DataError, match=expected):
            load_dataset("cifar10", "test", data_dir=tmp_path / "c")


def test_corrupted_cifar_tarball(tmp_path):
    path, _ = make_cifar10(tmp_path / "c")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupted or truncated archive"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "c")
    with tarfile.open(path, "w:gz") as tar:  # a valid archive without the batches
        tar.addfile(tarfile.TarInfo("cifar-10-batches-py/readme.html"), io.BytesIO(b""))
    with pytest.raises(DataError, match="archive lacks cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "c")


def test_cifar_missing_offline(tmp_path, isolated):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz or its extracted folder cifar-10-batches-py"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert isolated == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


@pytest.mark.parametrize("blob", [
    b"\x80\x02}r" + struct.pack("<I", 1 << 25) + b".",  # LONG_BINPUT: the memo grew to 2·index pointers
    b"\x80\x02}r" + struct.pack("<I", 2**32 - 1) + b".",  # ... 64 GiB
    b"\x80\x02}q\x05.",  # BINPUT
    b"(dp99999999\n.",  # protocol 0 PUT
    b"\x80\x02}q\x00]q\x00q\x07.",  # a later index past the count of stores
])
def test_pickle_forged_memo_index_is_refused_before_allocating(blob):
    with memory_bound(1 << 20), pytest.raises(DataError, match="not a valid CIFAR pickle: memo index") as err:
        D._safe_unpickle(blob, "evil")
    assert "\n" not in str(err.value)


def _renumber_memo_from_one(blob: bytes) -> bytes:
    """``blob`` with every BINPUT/BINGET index + 1: how Python 2's cPickle, which wrote CIFAR, numbers them."""
    out = bytearray(blob)
    for opcode, arg, pos in pickletools.genops(blob):
        if opcode.name in ("BINPUT", "BINGET"):
            assert arg < 255
            out[pos + 1] = arg + 1
        assert opcode.name not in ("LONG_BINPUT", "LONG_BINGET", "PUT", "GET", "MEMOIZE")
    return bytes(out)


def test_cifar_memo_numbered_from_one_loads(tmp_path):
    path, arrays = make_cifar10(tmp_path / "c", packed=False)
    for member in path.iterdir():
        member.write_bytes(_renumber_memo_from_one(member.read_bytes()))
    assert b"}q\x01(" in (path / "test_batch").read_bytes()  # as in the real files
    ds = load_dataset("cifar10", "test", data_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images, arrays["test"][0])
    np.testing.assert_array_equal(ds.labels, arrays["test"][1])


def _stand_ins() -> dict:
    return {key: (value, type(value), dict(vars(type(value)))) for key, value in D._ArrayOnlyUnpickler._ALLOWED.items()}


@pytest.mark.parametrize("state", [
    b"(N}X\x08\x00\x00\x00__init__X\x05\x00\x00\x00pwnedst",  # (None, {'__init__': 'pwned'}): setattr
    b"}X\x0c\x00\x00\x00__defaults__(K\x01ts",  # {'__defaults__': (1,)}: into __dict__
])
@pytest.mark.parametrize("global_", [
    b"cnumpy\nndarray\n", b"cnumpy\ndtype\n",
    b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy._core.multiarray\n_reconstruct\n",
])
def test_pickle_cannot_change_the_stand_ins(global_, state):
    """BUILD on what find_class handed out (the module's own class or function) set attributes
    on it, for this load and every later one: `ndarray.__init__ = 'pwned'`."""
    before = _stand_ins()
    blob = b"\x80\x02}(X\x01\x00\x00\x00a" + global_ + state + b"bu."
    with pytest.raises(DataError, match="not a valid CIFAR pickle: refusing to set the state of numpy") as err:
        D._safe_unpickle(blob, "evil")
    assert "\n" not in str(err.value)
    assert _stand_ins() == before
    for value, _, _ in before.values():
        with pytest.raises(AttributeError):
            value.anything = 1
    data = (np.arange(3072) % 251).astype(np.uint8)[None]
    np.testing.assert_array_equal(D._safe_unpickle(py2_pickle({"data": data, "labels": [1]}), "good")["data"], data)


def test_unreadable_extracted_cifar_file(tmp_path, monkeypatch):
    path, _ = make_cifar10(tmp_path, packed=False)
    broken = path / "test_batch"
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == broken:
            raise OSError(5, "Input/output error")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match="test_batch: cannot read: Input/output error") as err:
        load_dataset("cifar10", "test", data_dir=path)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- SVHN
def test_svhn_round_trip_maps_ten_to_zero(tmp_path):
    _, images, digits = make_svhn(tmp_path / "s", "train", n=12)
    make_svhn(tmp_path / "s" / "svhn", "test", n=3)
    ds = load_dataset("svhn", "train", data_dir=tmp_path / "s")
    assert ds.images.shape == (12, 3, 32, 32) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, digits)
    assert ds.labels[0] == 0 and ds.labels.max() == 9
    assert len(load_dataset("svhn", "test", data_dir=tmp_path / "s")) == 3


def test_corrupted_svhn(tmp_path):
    path, _, _ = make_svhn(tmp_path, "test", n=4)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="test_32x32.mat") as err:
        load_dataset("svhn", "test", data_dir=tmp_path)
    assert "\n" not in str(err.value)
    path.write_bytes(b"MATLAB 5.0 MAT-file" + os.urandom(300))
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", "test", data_dir=tmp_path)


def test_svhn_label_zero_is_refused(tmp_path):
    """SVHN writes digit 0 as 10; a 0 was accepted (and read as digit 0) though the message says 1..10."""
    import scipy.io

    x = np.zeros((32, 32, 3, 2), np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[0], [3]], np.uint8)})
    with pytest.raises(DataError, match="labels must be integers in 1..10"):
        load_dataset("svhn", "test", data_dir=tmp_path)


@pytest.mark.parametrize("cls, stored, values, message", [
    (9, 3, np.array([1, 300], "<i2"), "stored values 1..300 do not fit its class uint8"),  # 300 became 44
    (9, 3, np.array([-1, 3], "<i2"), "stored values -1..3 do not fit its class uint8"),
    (8, 9, np.array([1.0, 1.5]), "non-integer values stored for an integer class"),
    (8, 9, np.array([1.0, np.nan]), "non-integer values stored for an integer class"),
    (7, 9, np.array([1e300, 1.0]), "do not fit its class float32"),  # became inf
])
def test_mat_values_that_do_not_fit_the_class_are_refused(tmp_path, cls, stored, values, message):
    path = tmp_path / "v.mat"
    path.write_bytes(mat_bytes([("v", cls, (1, len(values)), stored, values.tobytes())]))
    with pytest.raises(DataError, match=message) as err:
        D.read_mat(path, ["v"])
    assert str(path) in str(err.value) and "'v'" in str(err.value) and "\n" not in str(err.value)
    # stored in a smaller type, as MATLAB does, and in range: fine
    path.write_bytes(mat_bytes([("v", 9, (1, 2), 3, np.array([1, 255], "<i2").tobytes()),
                                ("w", 7, (1, 2), 9, np.array([np.inf, 2.5]).tobytes())]))
    got = D.read_mat(path, ["v", "w"])
    assert got["v"].dtype == np.uint8 and got["v"].tolist() == [[1, 255]]
    assert got["w"].dtype == np.float32 and got["w"].tolist() == [[np.inf, 2.5]]


# --------------------------------------------------------------------------- batching and augmentation
def _toy(n=10, size=4, channels=1) -> ArrayDataset:
    images = np.arange(n * channels * size * size, dtype=np.int64).reshape(n, channels, size, size) % 251
    images[:, 0, 0, 0] = np.arange(n)  # sample id in a corner pixel
    return ArrayDataset(images.astype(np.uint8), np.arange(n) % 3, ["a", "b", "c"], "toy")


def _ids(batch_x: torch.Tensor) -> list[int]:
    return [round(v) for v in ((batch_x[:, 0, 0, 0] + 1) / 2 * 255).tolist()]


def test_batch_loader_covers_the_data_in_order():
    ds = _toy(10)
    loader = BatchLoader(ds, 4)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (4, 1, 4, 4)
    assert torch.equal(torch.cat([x for x, _ in batches]), to_float(ds.images, 255))
    assert len(BatchLoader(ds, 4, drop_last=True)) == 2 and len(list(BatchLoader(ds, 4, drop_last=True))) == 2


def test_shuffle_depends_only_on_seed_and_epoch():
    ds = _toy(50)

    def epoch_ids(seed, epoch, augment=None):
        loader = BatchLoader(ds, 8, shuffle=True, seed=seed, augment=augment)
        loader.set_epoch(epoch)
        return [(_ids(x), y.tolist(), x) for x, y in loader]

    first = epoch_ids(0, 3)
    assert sorted(i for ids, _, _ in first for i in ids) == list(range(50))
    again = epoch_ids(0, 3)
    assert [a[:2] for a in first] == [b[:2] for b in again]
    assert [a[0] for a in epoch_ids(0, 4)] != [a[0] for a in first]
    assert [a[0] for a in epoch_ids(1, 3)] != [a[0] for a in first]
    # with augmentation: a fresh loader (a resumed run) sees bit-identical batches
    aug = Augment(crop_padding=1, flip=True)
    one, two = epoch_ids(5, 2, aug), epoch_ids(5, 2, aug)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(one, two))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(one, epoch_ids(5, 3, aug)))


@pytest.mark.parametrize("n, world", [(20, 2), (21, 2), (10, 3), (2, 4)])
def test_sharding_covers_the_dataset(n, world):
    ds = _toy(n)
    loaders = [BatchLoader(ds, 3, shuffle=True, seed=7, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(1)
    shards = [[i for x, _ in loader for i in _ids(x)] for loader in loaders]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards) and len({len(lo) for lo in loaders}) == 1
    assert sorted(set(i for s in shards for i in s)) == list(range(n))
    assert sum(map(len, shards)) - n == per_rank * world - n  # only the padding repeats
    with pytest.raises(OnebitError):
        BatchLoader(ds, 3, rank=world, world_size=world)


def test_empty_dataset_and_bad_batch_size():
    empty = _toy(4).subset([])
    assert len(empty) == 0 and len(BatchLoader(empty, 4)) == 0 and list(BatchLoader(empty, 4)) == []
    with pytest.raises(OnebitError, match="batch size"):
        BatchLoader(_toy(4), 0)


def test_augment_flip_is_exactly_a_mirror():
    x = torch.randn(64, 3, 5, 7)
    out = Augment(crop_padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_augment_crop_is_a_window_of_the_padded_input():
    x = torch.rand(32, 2, 6, 6) * 2 - 1
    p = 2
    out = Augment(crop_padding=p, flip=False)(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    offsets = set()
    for o, pad in zip(out, padded):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(o, pad[:, dy:dy + 6, dx:dx + 6])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 5 and out.min() >= -1.0
    same = Augment(crop_padding=p, flip=True)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(same(x, g1), same(x, g2))


def test_split_validation_is_deterministic_and_disjoint():
    ds = _toy(40)
    train, val = split_validation(ds, 0.25, seed=1)
    assert len(train) == 30 and len(val) == 10
    ids = lambda d: d.images[:, 0, 0, 0].tolist()  # noqa: E731
    assert sorted(ids(train) + ids(val)) == list(range(40))
    again = split_validation(ds, 0.25, seed=1)
    assert ids(again[1]) == ids(val) and ids(split_validation(ds, 0.25, seed=2)[1]) != ids(val)
    assert len(split_validation(ds, 0.0, seed=1)[1]) == 0
    with pytest.raises(OnebitError):
        split_validation(ds, 1.0, seed=0)


def test_split_validation_refuses_an_empty_training_set():
    """round(0.96 · 10) = 10: every sample went to validation, and training ran on nothing."""
    assert [len(part) for part in split_validation(_toy(10), 0.9)] == [1, 9]
    with pytest.raises(OnebitError, match="0.96 of 10 samples of toy leaves no training samples") as err:
        split_validation(_toy(10), 0.96)
    assert "\n" not in str(err.value)
    with pytest.raises(OnebitError, match="no samples to train on"):
        split_validation(_toy(4).subset([]), 0.0)


# --------------------------------------------------------------------------- the real Fashion-MNIST
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def test_real_fashion_mnist(real_data_dir, isolated):
    folder = real_data_dir / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip(f"{folder} does not exist")
    for name, digest in FASHION_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    train = load_dataset("fashion_mnist", "train", data_dir=real_data_dir)
    test = load_dataset("fashion_mnist", "test", data_dir=real_data_dir)
    assert len(train) == 60000 and len(test) == 10000 and isolated == []
    assert train.images.shape == (60000, 1, 28, 28) and np.bincount(test.labels).tolist() == [1000] * 10


def test_cutout_overwrites_one_square_per_sample_with_noise():
    import torch

    from onebit.data import Augment

    x = torch.full((64, 1, 12, 12), 5.0)  # outside [-1, 1]: every overwritten pixel is visible
    out = Augment(crop_padding=0, flip=False, cutout=4)(x, torch.Generator().manual_seed(0))
    changed = out != 5.0
    assert (out[changed].abs() <= 1).all()
    per_sample = changed.flatten(1).sum(1)
    assert per_sample.max() == 16 and per_sample.min() >= 4  # a 4×4 square, clipped at the border
    rows, cols = changed[:, 0].any(2), changed[:, 0].any(1)
    assert (rows.sum(1) * cols.sum(1) == per_sample).all()  # the changed pixels form a rectangle
    with pytest.raises(OnebitError, match="cutout"):
        Augment(cutout=-1)


# --------------------------------------------------------------------------- without torch
#: Prepended to a subprocess script: makes ``import torch`` fail as if torch were not installed.
#: A meta-path finder rather than ``sys.modules["torch"] = None``: scikit-learn (the digits loader)
#: imports scipy, whose array-API helpers look ``torch`` up in ``sys.modules`` and crash on a None entry.
_NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def _run_without_torch(script: str) -> subprocess.CompletedProcess:
    src = str(Path(onebit.__file__).resolve().parents[1])
    env = dict(os.environ, ONEBIT_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, "-c", _NO_TORCH + script], capture_output=True, text=True,
                          env=env, timeout=300)


def test_load_dataset_and_listing_import_no_torch():
    # `onebit run --dataset` and `onebit datasets` must work where torch is not installed
    result = _run_without_torch("""
from onebit.data import DATASETS, dataset_info, load_dataset
ds = load_dataset("digits", "test")
assert ds.images.shape[1:] == (1, 8, 8) and len(ds) == 359, ds.images.shape
assert "digits" in DATASETS.names() and dataset_info("digits")["max_value"] == 16
from onebit.cli import main
assert main(["datasets"]) == 0
assert "torch" not in sys.modules or sys.modules["torch"] is None, "torch was imported"
print("ok", len(ds))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok 359"
    assert "digits" in result.stdout


@pytest.mark.parametrize("levels", [16, None], ids=["pixels", "float"])
def test_cli_run_on_a_dataset_without_torch(tmp_path, levels):
    from onebit.export import export_model
    from onebit.models import create_model

    kwargs = dict(hidden=16, depth=1, in_shape=(1, 8, 8), num_classes=10)
    model = create_model("binarynet_mlp", **kwargs).eval()
    path = tmp_path / "m.onebit"
    export_model(model, path, source={"name": "binarynet_mlp", "kwargs": {**kwargs, "in_shape": [1, 8, 8]}},
                 input_levels=levels)
    result = _run_without_torch(f"""
from onebit.cli import main
code = main(["run", {str(path)!r}, "--dataset", "digits"])
assert "torch" not in sys.modules or sys.modules["torch"] is None, "torch was imported"
sys.exit(code)
""")
    assert result.returncode == 0, result.stderr
    line = re.search(r"on digits \(test, 359 samples\): accuracy (\d+\.\d\d)%", result.stdout)
    assert line, result.stdout
    assert 0.0 <= float(line.group(1)) <= 100.0
