"""Datasets in their upstream file formats, batching and augmentation, without torchvision.

Every loader returns an :class:`ArrayDataset` (uint8 images ``N×C×H×W``, int64 labels) and is
registered in :data:`DATASETS`; :func:`load_dataset` is the one entry point::

    train = load_dataset("fashion_mnist", "train", data_dir="../shared/datasets")
    loader = BatchLoader(train, 100, shuffle=True, seed=0, augment=Augment(crop_padding=2, flip=False))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:     # x float32 in [-1, 1] (BinaryNet's input range), y int64
            ...

Where files are looked for (first directory holding every file a split needs wins):

1. ``data_dir`` itself, then ``data_dir/<name>`` and ``data_dir/<hyphenated-name>``
   (``fashion_mnist`` → ``fashion-mnist``; torchvision's ``MNIST/raw`` and ``FashionMNIST/raw`` too);
2. the same for each folder in ``$ONEBIT_DATA`` (``os.pathsep``-separated);
3. ``/usr/share/datasets/<hyphenated-name>`` (Debian's ``dataset-*`` packages);
4. the download cache ``$ONEBIT_CACHE/<name>`` (default ``$XDG_CACHE_HOME/onebit`` or ``~/.cache/onebit``).

MNIST and Fashion-MNIST use the same file names, so a folder whose labels are the official ones of
the *other* dataset is skipped (and named in the error when no other copy is found).

When nothing is found and ``download=True`` (and ``$ONEBIT_OFFLINE`` is unset) the upstream files are fetched into the cache:
written through :func:`onebit.files.atomic_write` and checked against the published checksums
*before* the rename, so a failed or tampered download leaves nothing behind. Files found locally
are not checksummed (a re-compressed or gunzipped copy is fine); they are validated structurally
instead — magic numbers, declared dimensions against the real payload length, label ranges,
image/label counts, gzip CRCs — and any problem is a one-line :class:`~onebit.errors.DataError`.

CIFAR's pickles are read with an unpickler that resolves no globals except numpy's array
reconstruction (``_reconstruct``, ``ndarray``, ``dtype``), and those to inert stand-ins, so a
hostile file cannot run code, nor make numpy allocate a declared size; SVHN's ``.mat`` files are
parsed by :func:`read_mat`, a strict reader of MATLAB level-5 files (see docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .errors import DataError, FileWriteError, OnebitError
from .files import atomic_write
from .registry import Registry

if TYPE_CHECKING:  # torch only where tensors are made, so that ``onebit run`` (numpy engine) works without it
    import torch

__all__ = [
    "ArrayDataset",
    "Augment",
    "BatchLoader",
    "DATASETS",
    "REMOTES",
    "SPLITS",
    "cache_dir",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "read_mat",
    "search_dirs",
    "split_validation",
    "to_float",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
#: System-wide dataset folders (Debian installs ``dataset-*`` packages here); a list so tests can patch it.
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]
DOWNLOAD_TIMEOUT_S = 60


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- dataset container
@dataclass
class ArrayDataset:
    """Images and labels in memory: ``images`` uint8 ``N×C×H×W``, ``labels`` int64 ``N``.

    ``max_value`` is the value of a full-intensity pixel (255 for 8-bit images, 16 for sklearn's
    digits); :func:`to_float` maps ``0..max_value`` onto ``[-1, 1]``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    max_value: int = 255

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            got = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
            raise DataError(f"dataset {self.name}: images must be a uint8 array N×C×H×W, got {got}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise DataError(f"dataset {self.name}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        self.labels = labels.astype(np.int64, copy=False)
        if len(self.labels) != len(images):
            raise DataError(f"dataset {self.name}: {len(images)} images but {len(self.labels)} labels")
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise DataError(f"dataset {self.name}: no class names")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"dataset {self.name}: labels must lie in 0..{len(self.classes) - 1}, "
                f"found {self.labels.min()}..{self.labels.max()}"
            )
        if not (isinstance(self.max_value, (int, np.integer)) and 0 < self.max_value <= 255):
            raise DataError(f"dataset {self.name}: max_value must be an integer in 1..255, got {self.max_value!r}")
        self.max_value = int(self.max_value)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayDataset":
        """The samples at ``indices`` (copied), same classes, name and range."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), self.name, self.max_value)


def to_float(images: np.ndarray | torch.Tensor, max_value: int | float) -> torch.Tensor:
    """Pixels ``0..max_value`` → float32 in ``[-1, 1]`` as ``x / max_value * 2 − 1`` (BinaryNet's range)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.to(torch.float32).div(float(max_value)).mul_(2.0).sub_(1.0)


def split_validation(ds: ArrayDataset, fraction: float, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """A deterministic random split ``(train, val)``, ``round(fraction·N)`` samples in ``val``.

    The same ``(ds, fraction, seed)`` always gives the same split; both parts keep the original order.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise OnebitError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(ds)
    n_val = int(round(float(fraction) * n))
    if n_val >= n:  # training on nothing would "succeed" with a meaningless model
        raise OnebitError(f"dataset {ds.name} has no samples to train on" if n == 0 else
                          f"validation fraction {fraction} of {n} samples of {ds.name} leaves no training samples")
    perm = np.random.default_rng(_seed_int(seed)).permutation(n)
    return ds.subset(np.sort(perm[n_val:])), ds.subset(np.sort(perm[:n_val]))


def _seed_int(*parts: int) -> int:
    """A 64-bit seed that depends only on ``parts`` (non-negative or not)."""
    entropy = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


# --------------------------------------------------------------------------- augmentation and batching
@dataclass(frozen=True)
class Augment:
    """Random crop with padding, random horizontal flip and cutout, batch-wise on ``B×C×H×W`` float tensors.

    The crop is the usual "pad by ``crop_padding`` then cut an ``H×W`` window at a random
    offset"; the border is filled with ``pad_value``, by default −1 — black, i.e. the zero padding
    torchvision's ``RandomCrop(padding=p)`` applies to raw pixels, in the ``[-1, 1]`` input range.
    Each sample gets its own offset and flip, drawn from ``generator``; the whole batch is one
    gather (no per-sample Python loop). ``cutout`` > 0 then overwrites a ``cutout×cutout`` square
    centred anywhere in the image (it may hang over the border) with uniform noise in [−1, 1],
    as McDonnell (2018, Section 3.2) does after DeVries & Taylor (2017).
    """

    crop_padding: int = 4
    flip: bool = True
    pad_value: float = -1.0
    cutout: int = 0

    def __post_init__(self) -> None:
        if int(self.crop_padding) < 0:
            raise OnebitError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if int(self.cutout) < 0:
            raise OnebitError(f"cutout must be >= 0, got {self.cutout}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise OnebitError(f"Augment expects a B×C×H×W batch, got shape {tuple(x.shape)}")
        import torch

        p = int(self.crop_padding)
        if p == 0 and not self.flip:
            return self._cutout(x, generator)
        b, c, h, w = x.shape
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p), value=float(self.pad_value))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        cols = torch.arange(w).expand(b, w)
        if self.flip:
            flipped = torch.rand(b, generator=generator) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(-1), cols)
        rows = dy[:, None] + torch.arange(h)  # B×H
        cols = dx[:, None] + cols  # B×W
        batch = torch.arange(b)[:, None, None, None]
        chan = torch.arange(c)[None, :, None, None]
        return self._cutout(x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]], generator)

    def _cutout(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        size = int(self.cutout)
        if size == 0:
            return x
        import torch

        b, c, h, w = x.shape
        top = torch.randint(0, h, (b,), generator=generator) - size // 2
        left = torch.randint(0, w, (b,), generator=generator) - size // 2
        rows = torch.arange(h)[None, :] - top[:, None]  # B×H: position inside the square
        cols = torch.arange(w)[None, :] - left[:, None]
        inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        return torch.where(inside[:, None], noise, x)


class BatchLoader:
    """Iterate ``(x, y)`` batches of an :class:`ArrayDataset`: ``x`` float32 ``B×C×H×W`` in ``[-1, 1]``,
    ``y`` int64.

    The shuffle order and the augmentation depend only on ``(seed, epoch)`` (set with
    :meth:`set_epoch`), so iterating an epoch twice — e.g. after resuming an interrupted run —
    yields exactly the same batches. For data-parallel training every rank uses the same
    permutation and takes every ``world_size``-th index of it (``rank``, ``rank + world_size``, …),
    after padding the permutation by repeating its start so that all ranks get the same number of
    samples (like ``torch.utils.data.DistributedSampler``). Augmentation draws also depend on the rank.
    The whole dataset is converted to one float tensor up front.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if int(batch_size) < 1:
            raise OnebitError(f"batch size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise OnebitError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        import torch

        self._x = to_float(dataset.images, dataset.max_value)
        self._y = torch.from_numpy(np.ascontiguousarray(dataset.labels, dtype=np.int64))

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (padded to equal length across ranks)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """The sample indices this rank visits in the current epoch, in order."""
        import torch

        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed_int(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # n > 0 here: total == n when n == 0
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, x, y in self.indexed():
            yield x, y

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The same batches as iterating the loader, each as ``(indices, x, y)``: which samples
        of the dataset the batch holds, e.g. to look up per-sample values such as a teacher's outputs."""
        import torch

        order = self.indices()
        generator = None
        if self.augment is not None:
            generator = torch.Generator().manual_seed(_seed_int(self.seed, self.epoch, self.rank, 0xA09))
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self._x.index_select(0, idx)
            if self.augment is not None:
                x = self.augment(x, generator)
            yield idx, x, self._y.index_select(0, idx)


# --------------------------------------------------------------------------- locating and downloading files
@dataclass(frozen=True)
class Remote:
    """One upstream file: where to fetch it and the digests a download must match (any one suffices)."""

    filename: str
    url: str
    md5: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    splits: tuple[str, ...] = SPLITS


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

#: Upstream files per dataset. MNIST/Fashion-MNIST md5s are the ones torchvision publishes for the
#: upstream ``.gz`` files; the SHA-256s are of byte-identical copies known to us (MNIST upstream,
#: and the Fashion-MNIST ``.gz`` files as Debian's ``dataset-fashion-mnist`` ships them, whose
#: gzip header differs from the zalando S3 copy but whose compressed payload does not).
REMOTES: dict[str, list[Remote]] = {
    "mnist": [
        Remote("train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz",
               ("f68b3c2dcbeaaa9fbdd348bbdeb94873",),
               ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",), ("train",)),
        Remote("train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz",
               ("d53e105ee54ea40749a09fcbcd1e9432",),
               ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",), ("train",)),
        Remote("t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz",
               ("9fb629c4189551a2d022fa330f9573f3",),
               ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",), ("test",)),
        Remote("t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz",
               ("ec29112dd5afa0611ce80d1b7f02629c",), (), ("test",)),
    ],
    "fashion_mnist": [
        Remote("train-images-idx3-ubyte.gz", _FASHION_URL + "train-images-idx3-ubyte.gz",
               ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",),
               ("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",), ("train",)),
        Remote("train-labels-idx1-ubyte.gz", _FASHION_URL + "train-labels-idx1-ubyte.gz",
               ("25c81989df183df01b3e8a0aad5dffbe",),
               ("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",), ("train",)),
        Remote("t10k-images-idx3-ubyte.gz", _FASHION_URL + "t10k-images-idx3-ubyte.gz",
               ("bef4ecab320f06d8554ea6380940ec79",),
               ("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",), ("test",)),
        Remote("t10k-labels-idx1-ubyte.gz", _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
               ("bb300cfdad3c16e7a12a480ee83cd310",),
               ("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",), ("test",)),
    ],
    "cifar10": [
        Remote("cifar-10-python.tar.gz", _CIFAR_URL + "cifar-10-python.tar.gz", ("c58f30108f718f92721af3b95e74349a",)),
    ],
    "cifar100": [
        Remote("cifar-100-python.tar.gz", _CIFAR_URL + "cifar-100-python.tar.gz", ("eb9058c3a382ffc7106e4002c42a8d85",)),
    ],
    "svhn": [
        Remote("train_32x32.mat", _SVHN_URL + "train_32x32.mat", ("e26dedcc434d2e4c54c9b2d4a06d8373",), (), ("train",)),
        Remote("test_32x32.mat", _SVHN_URL + "test_32x32.mat", ("eb5a983be6a315427106f1b164d9cef3",), (), ("test",)),
    ],
}

#: Extra sub-folder names tried under each search root (torchvision's layouts).
_ALIASES: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw",),
    "fashion_mnist": ("FashionMNIST/raw",),
    "cifar10": ("cifar-10",),
    "cifar100": ("cifar-100",),
}


def cache_dir(name: str) -> Path:
    """Where downloads of dataset ``name`` go: ``$ONEBIT_CACHE/<name>`` (default ``~/.cache/onebit/<name>``)."""
    root = os.environ.get("ONEBIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "onebit") if xdg else str(Path.home() / ".cache" / "onebit")
    return Path(root).expanduser() / name


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for dataset ``name``'s files, in order (see the module docstring)."""
    hyphen = name.replace("_", "-")
    subdirs = list(dict.fromkeys((name, hyphen, *_ALIASES.get(name, ()))))
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    roots += [Path(p).expanduser() for p in os.environ.get("ONEBIT_DATA", "").split(os.pathsep) if p]
    dirs: list[Path] = []
    for root in roots:
        dirs.append(root)
        dirs += [root / sub for sub in subdirs]
    dirs += [Path(system) / hyphen for system in SYSTEM_DATA_DIRS]
    dirs.append(cache_dir(name))
    return list(dict.fromkeys(dirs))


def _digests_match(remote: Remote, md5: str, sha256: str) -> bool:
    return md5 in remote.md5 or sha256 in remote.sha256


def _download(remote: Remote, dest: Path) -> None:
    """Fetch ``remote`` into ``dest`` atomically; a digest mismatch leaves nothing at ``dest``."""
    log.info("downloading %s to %s", remote.url, dest)
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    try:
        with urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with atomic_write(dest) as handle:
                while chunk := response.read(1 << 20):
                    md5.update(chunk)
                    sha.update(chunk)
                    handle.write(chunk)
                if not _digests_match(remote, md5.hexdigest(), sha.hexdigest()):
                    expected = ", ".join([*(f"md5 {d}" for d in remote.md5), *(f"sha256 {d}" for d in remote.sha256)])
                    raise DataError(
                        f"checksum mismatch for {remote.filename} downloaded from {remote.url}: "
                        f"got md5 {md5.hexdigest()}, expected {expected}; the file was not kept"
                    )
    except (DataError, FileWriteError):  # FileWriteError is an OSError, but the disk's fault, not the network's
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, EOFError) as exc:  # timeouts, resets
        reason = getattr(exc, "reason", None) or exc
        raise _NetworkError(f"cannot download {remote.url}: {_one_line(reason, 160)}") from None


class _NetworkError(DataError):
    pass


class _OtherDataset(DataError):
    """A probed folder holds files known to be another dataset's (same names, other content)."""


def _locate(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None,
    download: bool,
    probe: Callable[[Path], Any],
    wanted: str,
) -> Any:
    """The first result of ``probe(dir)`` over :func:`search_dirs`; else download, else a DataError.

    ``wanted`` names the expected files for the error message.
    """
    dirs = search_dirs(name, data_dir)
    misplaced: _OtherDataset | None = None
    for directory in dirs:
        if directory.is_dir():
            try:
                found = probe(directory)
            except _OtherDataset as exc:  # e.g. Fashion-MNIST under MNIST's file names: look further
                log.warning("skipping %s", exc)
                misplaced = misplaced or exc
                continue
            if found is not None:
                return found
    remotes = [r for r in REMOTES.get(name, []) if split in r.splits]
    if download and remotes:
        target = cache_dir(name)
        try:
            for remote in remotes:
                if not (target / remote.filename).is_file():
                    _download(remote, target / remote.filename)
        except _NetworkError as exc:
            tail = f"download failed ({exc})"
        except (DataError, FileWriteError):
            with contextlib.suppress(OSError):
                target.rmdir()  # only if empty: nothing half-downloaded is left
            raise
        else:
            found = probe(target)
            if found is not None:
                return found
            tail = f"downloaded files in {target} are incomplete"
        with contextlib.suppress(OSError):
            target.rmdir()
    else:
        tail = "downloading is off" if remotes else "it cannot be downloaded"
    where = ", ".join(str(d) for d in dirs)
    what = f"{misplaced}; no other copy of {name} {split} data" if misplaced else f"{name} {split} data not found"
    raise DataError(
        f"{what}: put {wanted} in one of: {where} "
        f"(or pass data_dir / --data-dir, or set ONEBIT_DATA); {tail}"
    )


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for dataset {name}; valid: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)
_IDX_UBYTE = 0x08
_CHUNK = 1 << 20


def _read_capped(stream: io.RawIOBase | io.BufferedIOBase, n: int, path: Path, what: str) -> bytearray:
    """Read exactly ``n`` bytes then EOF, growing the buffer only as real bytes arrive."""
    buf = bytearray()
    while True:
        chunk = stream.read(min(_CHUNK, n + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
        if len(buf) > n:
            raise DataError(f"{path}: trailing data after the {what} (file larger than its header declares)")
    if len(buf) < n:
        raise DataError(f"{path}: truncated: the header declares {n} bytes of {what}, the file holds {len(buf)}")
    return buf


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes (``.gz`` or raw) with ``ndim`` dimensions, validated.

    Checks the magic (``0x0000080{ndim}``), that the payload length equals the product of the
    declared dimensions (truncation and trailing bytes are errors) and the gzip CRC. Nothing is
    allocated from the declared size before the real bytes have been seen.
    """
    path = Path(path)
    kind = {1: "labels", 3: "images"}.get(ndim, f"{ndim}-d array")
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as stream:
            header = stream.read(4)
            if len(header) < 4:
                raise DataError(f"{path}: truncated: {len(header)} bytes, too short for an idx header")
            expected = 0x800 | ndim
            magic = int.from_bytes(header, "big")
            if magic != expected:
                hint = " (gzip data in a file not named .gz?)" if header[:2] == b"\x1f\x8b" else ""
                if header[:2] == b"\x00\x00" and header[2] != _IDX_UBYTE and header[3] == ndim:
                    hint = f" (element type 0x{header[2]:02x}; only unsigned bytes, 0x08, are valid here)"
                raise DataError(f"{path}: not an idx {kind} file: magic 0x{magic:08x}, expected 0x{expected:08x}{hint}")
            dim_bytes = stream.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise DataError(f"{path}: truncated idx header")
            dims = [int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            payload = _read_capped(stream, math.prod(dims), path, kind)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile, CRC failure, truncated stream
        raise DataError(f"{path}: corrupted or truncated gzip data: {_one_line(exc, 160)}") from None
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _idx_files(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_raw_or_gz(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


#: The first labels of the official label files. MNIST and Fashion-MNIST use the same file
#: names, and every bare search root is searched for both, so a folder of one must not pass for
#: the other; files found locally are not checksummed (any copy, gzipped or not, is fine), so the
#: labels tell them apart (ten of them: 10⁻¹⁰ odds that other labels start the same way).
_IDX_LABEL_HEADS: dict[str, dict[str, bytes]] = {
    "mnist": {"train": bytes([5, 0, 4, 1, 9, 2, 1, 3, 1, 4]), "test": bytes([7, 2, 1, 0, 4, 1, 4, 9, 5, 9])},
    "fashion_mnist": {"train": bytes([9, 0, 0, 3, 0, 2, 7, 2, 5, 5]), "test": bytes([9, 2, 1, 1, 6, 1, 4, 6, 5, 7])},
}
_IDX_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _label_head(path: Path, n: int) -> bytes | None:
    """The first ``n`` labels of an idx labels file, or None where that cannot be told cheaply
    (unreadable, corrupted, too short: :func:`read_idx` reports those when the file is loaded)."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as stream:
            head = stream.read(8 + n)
    except (OSError, EOFError, zlib.error):
        return None
    return head[8:] if len(head) == 8 + n and head[:4] == bytes([0, 0, _IDX_UBYTE, 1]) else None


def _check_not_other_idx_dataset(name: str, label_path: Path) -> None:
    """Raise :class:`_OtherDataset` if ``label_path`` is an official label file of the *other*
    idx dataset; any other labels (tests' small fixtures, a relabelled copy) pass."""
    head = _label_head(label_path, 10)
    if head is None:
        return
    for other, heads in _IDX_LABEL_HEADS.items():
        if other != name and head in heads.values():
            raise _OtherDataset(f"{label_path}: these are {_IDX_TITLES[other]} labels, not {_IDX_TITLES[name]} "
                                f"(both use the same file names: keep each in its own folder, e.g. "
                                f"{name.replace('_', '-')}/ and {other.replace('_', '-')}/)")


def _load_idx_dataset(name: str, split: str, data_dir, download: bool) -> ArrayDataset:
    _check_split(name, split)
    info = DATASETS.get(name).info
    image_stem, label_stem = _idx_files(split)

    def probe(directory: Path):
        images, labels = _find_raw_or_gz(directory, image_stem), _find_raw_or_gz(directory, label_stem)
        if not (images and labels):
            return None
        _check_not_other_idx_dataset(name, labels)
        return images, labels

    wanted = f"{image_stem}(.gz) and {label_stem}(.gz)"
    image_path, label_path = _locate(name, split, data_dir, download, probe, wanted)
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    _, h, w = info["input_shape"]
    if images.shape[1:] != (h, w):
        raise DataError(f"{image_path}: images are {images.shape[1]}×{images.shape[2]}, {name} has {h}×{w}")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if labels.size and int(labels.max()) >= info["num_classes"]:
        raise DataError(f"{label_path}: label {int(labels.max())} out of range 0..{info['num_classes'] - 1}")
    return ArrayDataset(images[:, None], labels.astype(np.int64), list(info["classes"]), name, 255)


# --------------------------------------------------------------------------- CIFAR (python pickles)
#: dtypes an array in a CIFAR pickle may have (plain numbers; never objects, strings or records)
_PICKLE_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})
_PICKLE_MAX_DIMS = 32


class _RefusedPickle(pickle.UnpicklingError):
    pass


class _Inert:
    """Base of what :meth:`_ArrayOnlyUnpickler.find_class` hands out: module-level singletons a
    pickle cannot change. They have no attributes to set (``__slots__ = ()``) and refuse BUILD,
    whereas a class or function handed out would take BUILD's ``setattr`` calls (a pickle could
    replace ``__init__`` or ``__defaults__``, for this load and every later one)."""

    __slots__ = ()
    name = "?"

    def __setstate__(self, state: Any) -> None:
        raise _RefusedPickle(f"refusing to set the state of {self.name}")

    def __repr__(self) -> str:
        return self.name


class _NdarrayTag(_Inert):
    """What the pickle's ``numpy.ndarray`` resolves to: only an argument of ``_reconstruct``."""

    __slots__ = ()
    name = "numpy.ndarray"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _RefusedPickle("refusing to call numpy.ndarray")


class _DtypeStub:
    """Stands in for ``numpy.dtype(spec, align, copy)`` and its ``__setstate__``; see :func:`_safe_unpickle`."""

    spec: str | None = None
    order: str = "|"

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = False) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or spec not in _PICKLE_DTYPES:
            raise _RefusedPickle(f"refusing array dtype {str(spec)[:20]!r} (plain numbers only)")
        self.spec = spec

    def __setstate__(self, state: Any) -> None:
        # numpy: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and 2 <= len(state) <= 9):
            raise _RefusedPickle("malformed dtype state")
        order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "=") or any(part is not None for part in state[2:5]):
            raise _RefusedPickle("refusing a structured or sub-array dtype")
        self.order = order

    def numpy(self) -> np.dtype:
        if self.spec is None:
            raise _RefusedPickle("dtype without a type")
        return np.dtype(("<" if self.order in ("|", "=") else self.order) + self.spec)


class _ArrayStub:
    """Stands in for ``_reconstruct(ndarray, ...)``; ``__setstate__`` only records the state.

    The array is built afterwards by :meth:`numpy` from the recorded ``(version, shape, dtype,
    fortran, raw bytes)``, after checking that the bytes are exactly what the shape needs.
    """

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def numpy(self) -> np.ndarray:
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _RefusedPickle("malformed array state")
        version, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= _PICKLE_MAX_DIMS
                and all(type(d) is int and d >= 0 for d in shape)):
            raise _RefusedPickle(f"malformed array shape {str(shape)[:60]}")
        if not isinstance(dtype, _DtypeStub) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise _RefusedPickle("malformed array state")
        dt = dtype.numpy()
        if math.prod(shape) * dt.itemsize != len(raw):
            raise _RefusedPickle(f"array of shape {shape} and dtype {dt} needs {math.prod(shape) * dt.itemsize} bytes, "
                                 f"the pickle holds {len(raw)}")
        array = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
        return np.array(array, dtype=dt.newbyteorder("="), order="C")  # own, writable, native order


class _ReconstructStub(_Inert):
    """Stands in for ``numpy.core.multiarray._reconstruct``: a fresh :class:`_ArrayStub` per array."""

    __slots__ = ()
    name = "numpy.core.multiarray._reconstruct"

    def __call__(self, cls: Any, shape: Any = (0,), dtype: Any = b"b") -> _ArrayStub:
        if cls is not _NDARRAY:
            raise _RefusedPickle("_reconstruct of something other than numpy.ndarray")
        return _ArrayStub()


class _DtypeFactory(_Inert):
    """Stands in for the ``numpy.dtype`` class: calling it makes a fresh :class:`_DtypeStub`."""

    __slots__ = ()
    name = "numpy.dtype"

    def __call__(self, spec: Any = None, align: Any = False, copy: Any = False) -> _DtypeStub:
        return _DtypeStub(spec, align, copy)


_NDARRAY, _RECONSTRUCT, _DTYPE = _NdarrayTag(), _ReconstructStub(), _DtypeFactory()


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves no global except numpy's ndarray reconstruction, so no code in a pickle can run.

    Even those three names resolve to inert stand-ins (:class:`_ArrayStub`, :class:`_DtypeStub`,
    made by the immutable :class:`_Inert` singletons): numpy's own ``_reconstruct``/``__setstate__``
    never see the untrusted state, so a declared shape cannot allocate memory, a forged dtype
    state cannot corrupt numpy, and no pickle can change what the next load resolves to.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DTYPE,
    }

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan_pickle(blob: bytes) -> None:
    """Walk the opcodes without running them: every declared length must fit in the bytes left,
    and no memo index may run ahead of the entries stored so far.

    CPython's unpickler allocates a ``BINBYTES8``/``BINUNICODE8``/... argument from its
    declared size before reading it (a 20-byte pickle can ask for terabytes); pickletools reads
    what is there and checks the length afterwards. Its memo is an array that grows to twice
    the largest index stored (a 9-byte ``LONG_BINPUT`` of 2³²−1 asks for 64 GiB); picklers
    number their entries in order (from 1 in Python 2's cPickle, which wrote CIFAR's files,
    from 0 elsewhere), so an index past the count of stores so far + 1 is refused, which
    keeps the memo proportional to the pickle's size.
    """
    import pickletools

    stores = 0
    for opcode, arg, pos in pickletools.genops(io.BytesIO(blob)):
        if opcode.name in _MEMO_PUTS:
            if not isinstance(arg, int) or not 0 <= arg <= stores + 1:
                raise _RefusedPickle(f"memo index {str(arg)[:20]} out of order at byte {pos} "
                                     f"(expected at most {stores + 1})")
            stores += 1
        elif opcode.name == "MEMOIZE":  # stores at the memo's current length: always in order
            stores += 1


def _safe_unpickle(blob: bytes, source: str) -> dict:
    try:
        _prescan_pickle(blob)
        obj = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
        if not isinstance(obj, dict):
            raise DataError(f"{source}: not a valid CIFAR pickle: top level is {type(obj).__name__}, not dict")
        entries = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
        return {k: v.numpy() if isinstance(v, _ArrayStub) else v for k, v in entries.items()}
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError... from hostile bytes
        raise DataError(f"{source}: not a valid CIFAR pickle: {_one_line(exc, 160) or type(exc).__name__}") from None


def _text_list(value: Any, source: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (bytes, str)) for v in value):
        raise DataError(f"{source}: {key!r} must be a list of names")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]


def _cifar_batch(entries: dict, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data, labels = entries.get("data"), entries.get(label_key)
    if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise DataError(f"{source}: 'data' must be a uint8 array N×3072, got {got}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{source}: {label_key!r} must be a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{source}: {len(data)} images but {len(labels)} labels")
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{source}: labels must lie in 0..{num_classes - 1}")
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), y


#: the largest file a CIFAR archive may hold (CIFAR-100's train pickle is 155 MB)
MAX_MEMBER_BYTES = 1 << 30


def _read_member(handle: IO[bytes]) -> bytes:
    """All of an archive member, read in chunks: memory grows with the bytes really there, not
    with the size its header declares (``read()`` would allocate that up front)."""
    chunks = []
    while chunk := handle.read(_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_members(source: Path, folder: str, members: list[str]) -> dict[str, bytes]:
    """The named files of CIFAR's python layout, from the extracted folder or the ``.tar.gz``."""
    if source.is_dir():
        out = {}
        for member in members:
            path = source / member
            if not path.is_file():
                raise DataError(f"{source}: missing {member}")
            try:
                out[member] = path.read_bytes()
            except OSError as exc:  # no permission, an I/O error of the disk
                raise DataError(f"{path}: cannot read: {_one_line(exc.strerror or exc, 120)}") from None
        return out
    out: dict[str, bytes] = {}
    wanted = {f"{folder}/{m}": m for m in members}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for info in tar:  # one pass: never seek back in the gzip stream
                key = wanted.get(info.name[2:] if info.name.startswith("./") else info.name)
                if key is None or key in out:
                    continue
                if not info.isfile():
                    raise DataError(f"{source}: {info.name} is not a regular file")
                if info.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{source}: {info.name} declares {info.size} bytes, more than any CIFAR file "
                                    f"({MAX_MEMBER_BYTES}); corrupted archive")
                handle = tar.extractfile(info)
                out[key] = _read_member(handle) if handle is not None else b""
                if len(out) == len(members):
                    break
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupted or truncated archive: {_one_line(exc, 160)}") from None
    missing = [m for m in members if m not in out]
    if missing:
        raise DataError(f"{source}: archive lacks {folder}/{missing[0]}")
    return out


def _load_cifar(name: str, split: str, data_dir, download: bool, label_key: str, num_classes: int) -> ArrayDataset:
    _check_split(name, split)
    if name == "cifar10":
        folder, tarball = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, names_key = "batches.meta", "label_names"
    else:
        folder, tarball = "cifar-100-python", "cifar-100-python.tar.gz"
        batches = ["train" if split == "train" else "test"]
        meta, names_key = "meta", "fine_label_names" if label_key == "fine_labels" else "coarse_label_names"
    members = [*batches, meta]

    def probe(directory: Path):
        for candidate in (directory / folder, directory):
            if all((candidate / m).is_file() for m in members):
                return candidate
        return directory / tarball if (directory / tarball).is_file() else None

    source = _locate(name, split, data_dir, download, probe, f"{tarball} or its extracted folder {folder}/")
    blobs = _read_members(source, folder, members)
    meta_entries = _safe_unpickle(blobs[meta], f"{source}:{meta}")
    classes = _text_list(meta_entries.get(names_key), f"{source}:{meta}", names_key)
    if len(classes) != num_classes:
        raise DataError(f"{source}:{meta}: {len(classes)} class names, expected {num_classes}")
    parts = [_cifar_batch(_safe_unpickle(blobs[b], f"{source}:{b}"), f"{source}:{b}", label_key, num_classes)
             for b in batches]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ArrayDataset(images, labels, classes, name, 255)


# --------------------------------------------------------------------------- SVHN (.mat)
# A strict reader of MATLAB's level-5 MAT-file (what SVHN ships), for plain numeric arrays only.
# scipy.io.loadmat is not used: its compiled reader indexes a table with the element type read
# from the file, so one flipped bit in a type field crashes the interpreter (segfault).
_MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MAT_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MAT_MAX_DIMS = 32


class _MatTag:
    __slots__ = ("type", "size", "start", "end")

    def __init__(self, type_: int, size: int, start: int, end: int) -> None:
        self.type, self.size, self.start, self.end = type_, size, start, end


def _mat_tag(buf: bytes, pos: int, limit: int, order: str, where: str, pad: bool = True) -> _MatTag:
    """The data element at ``buf[pos:limit]``: its type, size, data offset and the next element's offset."""
    if limit - pos < 8:
        raise DataError(f"{where}: truncated (an element tag needs 8 bytes, {max(limit - pos, 0)} left)")
    first, second = struct.unpack_from(order + "II", buf, pos)
    if first >> 16:  # "small data element": type and size in 4 bytes, up to 4 bytes of data after them
        type_, size = first & 0xFFFF, first >> 16
        if size > 4:
            raise DataError(f"{where}: small data element of {size} bytes (at most 4)")
        return _MatTag(type_, size, pos + 4, pos + 8)
    start = pos + 8
    if second > limit - start:
        raise DataError(f"{where}: an element declares {second} bytes, only {limit - start} follow")
    end = start + second + ((-second) % 8 if pad else 0)
    return _MatTag(first, second, start, min(end, limit))


def _mat_inflate(buf: bytes, tag: _MatTag, order: str, where: str) -> bytes:
    """The element inside a ``miCOMPRESSED`` one; output grows only as real bytes are inflated."""
    zstream = zlib.decompressobj()
    data = memoryview(buf)[tag.start:tag.start + tag.size]
    try:
        head = zstream.decompress(data, 8)
        if len(head) < 8:
            raise DataError(f"{where}: truncated compressed variable")
        first, second = struct.unpack(order + "II", head)
        want = 8 if first >> 16 else 8 + second
        parts = [head]
        have = 8
        while have < want:
            part = zstream.decompress(zstream.unconsumed_tail, min(want - have, _CHUNK))
            if not part:
                break
            parts.append(part)
            have += len(part)
        if have < want:
            raise DataError(f"{where}: compressed variable holds {have} bytes, its header declares {want}")
        if zstream.decompress(zstream.unconsumed_tail, 1) or not zstream.eof:
            raise DataError(f"{where}: compressed variable has trailing or missing data")
    except zlib.error as exc:
        raise DataError(f"{where}: corrupted compressed variable: {_one_line(exc, 120)}") from None
    return b"".join(parts)


def _mat_matrix(buf: bytes, tag: _MatTag, order: str, where: str, wanted: set[str]) -> tuple[str, np.ndarray | None]:
    """``(name, array)`` of a ``miMATRIX`` element; the array is None when ``name`` is not wanted."""
    limit = tag.start + tag.size
    flags = _mat_tag(buf, tag.start, limit, order, where)
    if flags.type != _MI_UINT32 or flags.size != 8:
        raise DataError(f"{where}: malformed array flags")
    flag_word = struct.unpack_from(order + "I", buf, flags.start)[0]
    dims = _mat_tag(buf, flags.end, limit, order, where)
    if dims.type != _MI_INT32 or dims.size % 4 or not 2 <= dims.size // 4 <= _MAT_MAX_DIMS:
        raise DataError(f"{where}: malformed array dimensions")
    shape = struct.unpack_from(f"{order}{dims.size // 4}i", buf, dims.start)
    if min(shape) < 0:
        raise DataError(f"{where}: negative array dimension {min(shape)}")
    name_tag = _mat_tag(buf, dims.end, limit, order, where)
    if name_tag.type != _MI_INT8:
        raise DataError(f"{where}: malformed array name")
    try:
        name = bytes(buf[name_tag.start:name_tag.start + name_tag.size]).decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{where}: array name is not ASCII") from None
    if name not in wanted:
        return name, None
    cls = _MAT_CLASSES.get(flag_word & 0xFF)
    if cls is None or flag_word & 0x0800:  # 0x0800: complex
        raise DataError(f"{where}: variable {name!r} is not a real numeric array (class {flag_word & 0xFF})")
    real = _mat_tag(buf, name_tag.end, limit, order, where)
    code = _MAT_TYPES.get(real.type)
    if code is None:
        raise DataError(f"{where}: variable {name!r} has data of unknown type {real.type}")
    stored = np.dtype(order + code)
    count = math.prod(shape)
    if count * stored.itemsize != real.size:
        raise DataError(f"{where}: variable {name!r} of shape {list(shape)} needs {count * stored.itemsize} bytes "
                        f"of {code}, holds {real.size}")
    values = np.frombuffer(buf, dtype=stored, count=count, offset=real.start)
    array = _mat_cast(values, np.dtype(cls), f"{where}: variable {name!r}")
    return name, array.reshape(shape, order="F")  # MATLAB is column-major


def _mat_cast(values: np.ndarray, target: np.dtype, where: str) -> np.ndarray:
    """``values`` (the stored type) as the array's class, refusing values the class cannot hold:
    MATLAB stores data in the smallest type that fits, so a stored value that does not fit was
    corrupted, and ``astype`` would silently wrap it (300 → 44) or make it inf."""
    if values.size and values.dtype != target:
        to_integer = target.kind in "iu"
        if to_integer and values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
            raise DataError(f"{where}: non-integer values stored for an integer class ({target})")
        info = np.iinfo(target) if to_integer else np.finfo(target)
        limits = (info.min, info.max) if to_integer else (float(info.min), float(info.max))
        low, high = values.min().item(), values.max().item()
        if values.dtype.kind == "f" and target.kind == "f":  # infinities and NaNs are valid floats
            finite = values[np.isfinite(values)]
            low, high = (finite.min().item(), finite.max().item()) if finite.size else (0.0, 0.0)
        if low < limits[0] or high > limits[1]:
            raise DataError(f"{where}: stored values {low:.6g}..{high:.6g} do not fit its class {target} "
                            f"({limits[0]:.6g}..{limits[1]:.6g}); corrupted file")
    return values.astype(target, copy=True)


def read_mat(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The real numeric variables ``names`` of a MATLAB level-5 ``.mat`` file (compressed or not).

    Checks the header, every element's declared size against the bytes that follow it, the
    data type and size of each wanted variable against its dimensions, and zlib's checksum of
    compressed variables; any problem is a one-line :class:`~onebit.errors.DataError`.
    Variables not in ``names`` are skipped; missing ones are simply absent from the result.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(buf) < 128:
        raise DataError(f"{path}: truncated: {len(buf)} bytes, too short for a .mat header")
    if buf[:4] == b"\x89HDF" or buf[512:516] == b"\x89HDF":
        raise DataError(f"{path}: a MATLAB 7.3 (HDF5) file; save it with -v7 (or -v6)")
    order = {b"IM": "<", b"MI": ">"}.get(buf[126:128])
    if order is None or struct.unpack_from(order + "H", buf, 124)[0] != 0x0100:
        raise DataError(f"{path}: not a MATLAB level-5 .mat file (bad header)")
    wanted = set(names)
    found: dict[str, np.ndarray] = {}
    pos = 128
    while pos < len(buf):
        where = f"{path}: byte {pos}"
        tag = _mat_tag(buf, pos, len(buf), order, where, pad=False)
        pos = tag.start + tag.size
        if tag.type == _MI_COMPRESSED:
            inner = _mat_inflate(buf, tag, order, where)
            tag = _mat_tag(inner, 0, len(inner), order, where, pad=False)
            element = inner
        else:
            element = buf
        if tag.type != _MI_MATRIX:
            raise DataError(f"{where}: unexpected element type {tag.type} at the top level")
        if tag.size == 0:
            continue  # an empty variable
        name, array = _mat_matrix(element, tag, order, where, wanted)
        if array is not None:
            if name in found:
                raise DataError(f"{path}: variable {name!r} appears twice")
            found[name] = array
    return found


def _load_svhn(split: str, data_dir, download: bool) -> ArrayDataset:
    _check_split("svhn", split)
    filename = f"{split}_32x32.mat"

    def probe(directory: Path):
        return directory / filename if (directory / filename).is_file() else None

    path = _locate("svhn", split, data_dir, download, probe, filename)
    mat = read_mat(path, ["X", "y"])
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{getattr(x, 'dtype', None)} {getattr(x, 'shape', None)}"
        raise DataError(f"{path}: 'X' must be a uint8 array 32×32×3×N, got {got}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{path}: 'y' must hold {x.shape[3]} numeric labels")
    labels = y.reshape(-1, order="F")
    if labels.size and (not np.all(labels == np.round(labels)) or labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels must be integers in 1..10 (10 stands for digit 0)")
    labels = labels.astype(np.int64) % 10  # SVHN writes digit 0 as label 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # H×W×C×N → N×C×H×W
    return ArrayDataset(images, labels, [str(d) for d in range(10)], "svhn", 255)


# --------------------------------------------------------------------------- registry
DATASETS = Registry("dataset")

_DIGIT_NAMES = [str(d) for d in range(10)]
_FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
_CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _info(**kwargs):
    """Attach a static description (``.info``) to a loader: shape and classes, known without any file."""

    def attach(fn):
        classes = kwargs.get("classes")
        fn.info = {"name": fn.__name__, **kwargs, "classes": tuple(classes) if classes else None}
        return fn

    return attach


@DATASETS.register
@_info(num_classes=10, input_shape=(1, 8, 8), max_value=16, classes=_DIGIT_NAMES)
def digits(split: str, data_dir=None, download: bool = True) -> ArrayDataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, values 0..16), bundled: no download."""
    _check_split("digits", split)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = []
    for c in range(10):  # stratified 80/20, fixed seed: the same split everywhere
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(0.2 * len(members)))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    keep = is_test if split == "test" else ~is_test
    return ArrayDataset(np.ascontiguousarray(images[keep]), labels[keep], list(_DIGIT_NAMES), "digits", 16)


@DATASETS.register
@_info(num_classes=10, input_shape=(1, 28, 28), max_value=255, classes=_DIGIT_NAMES)
def mnist(split: str, data_dir=None, download: bool = True) -> ArrayDataset:
    """MNIST handwritten digits, 28×28 grayscale, 60k/10k (idx files, .gz or raw)."""
    return _load_idx_dataset("mnist", split, data_dir, download)


@DATASETS.register
@_info(num_classes=10, input_shape=(1, 28, 28), max_value=255, classes=_FASHION_NAMES)
def fashion_mnist(split: str, data_dir=None, download: bool = True) -> ArrayDataset:
    """Zalando's Fashion-MNIST clothing images, 28×28 grayscale, 60k/10k (idx files, .gz or raw)."""
    return _load_idx_dataset("fashion_mnist", split, data_dir, download)


@DATASETS.register
@_info(num_classes=10, input_shape=(3, 32, 32), max_value=255, classes=_CIFAR10_NAMES)
def cifar10(split: str, data_dir=None, download: bool = True) -> ArrayDataset:
    """CIFAR-10 colour images, 32×32, 50k/10k, 10 classes (python tarball or extracted folder)."""
    return _load_cifar("cifar10", split, data_dir, download, "labels", 10)


@DATASETS.register
@_info(num_classes=100, input_shape=(3, 32, 32), max_value=255, classes=None)
def cifar100(split: str, data_dir=None, download: bool = True, label_mode: str = "fine") -> ArrayDataset:
    """CIFAR-100 colour images, 32×32, 50k/10k, 100 fine classes (label_mode="coarse": 20)."""
    if label_mode not in ("fine", "coarse"):
        raise DataError(f"cifar100 label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    classes = 100 if label_mode == "fine" else 20
    return _load_cifar("cifar100", split, data_dir, download, f"{label_mode}_labels", classes)


@DATASETS.register
@_info(num_classes=10, input_shape=(3, 32, 32), max_value=255, classes=_DIGIT_NAMES)
def svhn(split: str, data_dir=None, download: bool = True) -> ArrayDataset:
    """Street View House Numbers, 32×32 colour digits, 73k/26k (the cropped-digit .mat files)."""
    return _load_svhn(split, data_dir, download)


def dataset_info(name: str) -> dict[str, Any]:
    """Static facts about dataset ``name`` — ``num_classes``, ``input_shape`` (C, H, W), ``max_value``,
    ``classes`` (None where they come from the files) and ``description`` — without touching any file."""
    fn = DATASETS.get(name)
    return {**fn.info, "description": DATASETS.describe(name)}


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 **kwargs: Any) -> ArrayDataset:
    """Load split ``"train"`` or ``"test"`` of the registered dataset ``name`` (see the module docstring)."""
    download = download and not os.environ.get("ONEBIT_OFFLINE")
    return DATASETS.get(name)(split, data_dir=data_dir, download=download, **kwargs)
