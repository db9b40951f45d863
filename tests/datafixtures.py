"""Tiny dataset files in the exact upstream formats, written on the fly for tests/test_data.py.

- idx (MNIST, Fashion-MNIST): big-endian magic ``0x00000803``/``0x00000801``, dims, uint8 payload;
  ``.gz`` or raw by the file name.
- CIFAR python version: Python-2-style pickles (strings as py2 ``str`` opcodes, so they load as
  ``bytes`` with ``encoding="bytes"``, and arrays as ``numpy.core.multiarray._reconstruct``) holding
  ``{b'data': uint8 N×3072, b'labels': [int]}`` (CIFAR-100: ``b'fine_labels'``, ``b'coarse_labels'``),
  in ``cifar-10-batches-py/`` or ``cifar-100-python/``, optionally packed into the ``.tar.gz``.
- SVHN: ``X`` uint8 32×32×3×N and ``y`` N×1 with 10 for digit 0, via ``scipy.io.savemat``;
  :func:`mat_bytes` writes MATLAB level-5 variables by hand where scipy would not (data stored
  in another type than the array's class, as MATLAB itself does to save space).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------- idx
def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an idx file, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def make_idx_dataset(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0,
                     size: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four MNIST-layout files in ``directory``; returns ``{split: (images N×H×W, labels N)}``."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(Path(directory) / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(Path(directory) / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


# --------------------------------------------------------------------------- Python-2-style pickles
class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us override per-type saving
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2's cPickle (protocol 2) wrote CIFAR's batches."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the 2009 files say numpy.core (GLOBAL is newline-delimited text)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _pack(root: Path, folder: str, files: dict[str, bytes], tarball: str | None) -> Path:
    if tarball is None:
        for name, blob in files.items():
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        return root / folder
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / tarball, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return root / tarball


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 3, packed: bool = True, seed: int = 0,
                 overrides: dict[str, bytes] | None = None):
    """``cifar-10-python.tar.gz`` (or the extracted ``cifar-10-batches-py/``) under ``root``.

    Returns ``(path, {split: (images N×3×32×32, labels N)})``; ``overrides`` replaces member files.
    """
    rng = np.random.default_rng(seed)
    files, arrays = {}, {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        files[name] = py2_pickle({"batch_label": f"{name} of 5", "data": data, "labels": labels,
                                  "filenames": [f"img_{i}.png" for i in range(n)]})
        split = "test" if name == "test_batch" else "train"
        arrays[split][0].append(data.reshape(n, 3, 32, 32))
        arrays[split][1].append(np.array(labels))
    files["batches.meta"] = py2_pickle({"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES,
                                        "num_vis": 3072})
    files.update(overrides or {})
    path = _pack(Path(root), "cifar-10-batches-py", files, "cifar-10-python.tar.gz" if packed else None)
    return path, {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in arrays.items()}


def make_cifar100(root: Path, n_train: int = 6, n_test: int = 4, packed: bool = True, seed: int = 0):
    """``cifar-100-python.tar.gz`` (or ``cifar-100-python/``); returns ``(path, {split: (x, fine, coarse)})``."""
    rng = np.random.default_rng(seed)
    files, arrays = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        files[split] = py2_pickle({"filenames": [f"f{i}.png" for i in range(n)], "batch_label": split,
                                   "fine_labels": fine, "coarse_labels": coarse, "data": data})
        arrays[split] = (data.reshape(n, 3, 32, 32), np.array(fine), np.array(coarse))
    files["meta"] = py2_pickle({"fine_label_names": [f"fine{i}" for i in range(100)],
                                "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    path = _pack(Path(root), "cifar-100-python", files, "cifar-100-python.tar.gz" if packed else None)
    return path, arrays


# --------------------------------------------------------------------------- SVHN
def make_svhn(root: Path, split: str = "train", n: int = 7, seed: int = 0):
    """``<split>_32x32.mat`` under ``root``; returns ``(path, images N×3×32×32, digits N)``."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    digits = np.arange(n) % 10
    digits[0] = 0  # make sure the 10 ↔ 0 mapping is exercised
    x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # N×C×H×W → H×W×C×N
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    path = Path(root) / f"{split}_32x32.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": x, "y": y})
    return path, images, digits


def _mat_element(type_: int, data: bytes) -> bytes:
    return struct.pack("<II", type_, len(data)) + data + bytes(-len(data) % 8)


def mat_bytes(variables: list[tuple[str, int, tuple[int, ...], int, bytes]]) -> bytes:
    """A little-endian level-5 ``.mat`` file of ``(name, class, shape, stored type, raw data)``
    variables, uncompressed; class and type codes as in the MAT-file format (9 = uint8 class,
    6 = double class; 2 = miUINT8, 3 = miINT16, 9 = miDOUBLE)."""
    out = b"MATLAB 5.0 MAT-file, written by tests".ljust(116) + bytes(8) + struct.pack("<H", 0x0100) + b"IM"
    for name, cls, shape, stored, data in variables:
        body = (_mat_element(6, struct.pack("<II", cls, 0)) + _mat_element(5, struct.pack(f"<{len(shape)}i", *shape))
                + _mat_element(1, name.encode("ascii")) + _mat_element(stored, data))
        out += _mat_element(14, body)
    return out


@contextlib.contextmanager
def memory_bound(limit: int):
    """Peak Python/numpy allocation inside the block must stay below ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes, limit {limit}"
