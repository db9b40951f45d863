"""Every file reader under fuzzing: idx, CIFAR pickles and tarballs, SVHN .mat, .onebit, checkpoints.

Each reader gets valid files mutated the way real damage and hostile files look — truncation,
wrong magic, huge declared sizes, negative or overflowing shapes, bit flips in header and
payload, inserted and deleted bytes — and, where a grammar is cheap to write, files generated
from scratch (pickle opcode programs, MAT elements, .onebit graphs with valid checksums). The
outcome for every bad file is the reader's :mod:`onebit.errors` class with a one-line message;
never a crash, a hang, a MemoryError from a declared size, or a silently wrong result. Where a
file format has a checksum over everything (gzip, .onebit) "silently wrong" is checked exactly;
elsewhere a successful read must agree with an independent decoding of the same bytes.

The fast suite runs a few dozen examples per reader (derandomized: the same cases every run);
``-m slow`` runs thousands. ``ONEBIT_FUZZ_COUNTS=path.json`` adds the number of cases each
surface ran to that file (docs/reliability.md quotes them). The bugs found are pinned by the
``test_regression_*`` tests at the end.
"""
from __future__ import annotations

import collections
import functools
import gzip
import io
import json
import math
import os
import pickle
import struct
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onebit import data as D
from onebit.data import load_dataset, read_idx, read_mat
from onebit.engine import format as fmt
from onebit.engine import kernels, load
from onebit.errors import CheckpointError, DataError, FormatError
from onebit.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint

from datafixtures import idx_bytes, make_cifar10, make_svhn, memory_bound, py2_pickle

FAST_EXAMPLES = 40
SLOW_EXAMPLES = 2000
_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
fast = settings(max_examples=FAST_EXAMPLES, derandomize=True, **_COMMON)
slow = settings(max_examples=SLOW_EXAMPLES, **_COMMON)

COUNTS: collections.Counter = collections.Counter()
SILENT: collections.Counter = collections.Counter()  # accepted a changed file without error


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    target = os.environ.get("ONEBIT_FUZZ_COUNTS")
    if target and COUNTS:
        path = Path(target)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        for key, value in COUNTS.items():
            merged[key] = merged.get(key, 0) + value
        for key, value in SILENT.items():
            merged[f"silent:{key}"] = merged.get(f"silent:{key}", 0) + value
        path.write_text(json.dumps(merged, indent=1, sort_keys=True))


@pytest.fixture(autouse=True)
def _quiet_and_isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEBIT_DATA", raising=False)
    monkeypatch.setenv("ONEBIT_OFFLINE", "1")
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", [tmp_path / "system"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text, f"not a one-line message: {text!r}"


# --------------------------------------------------------------------------- mutations
EXTREMES = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**63, 2**64 - 1]
_pos = st.integers(0, 2**20)
EDIT = st.one_of(
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("flip_head"), st.integers(0, 255), st.integers(0, 7)),
    st.tuples(st.just("byte"), _pos, st.integers(0, 255)),
    st.tuples(st.just("int"), _pos, st.sampled_from(EXTREMES), st.sampled_from(["<I", ">I", "<Q", ">Q"])),
    st.tuples(st.just("int_head"), st.integers(0, 255), st.sampled_from(EXTREMES), st.sampled_from(["<I", ">I", "<Q", ">Q"])),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("duplicate"), _pos, _pos, st.integers(1, 32)),
)
EDITS = st.lists(EDIT, min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    d = bytearray(data)
    for edit in edits:
        kind = edit[0]
        n = max(len(d), 1)
        if kind == "truncate":
            d = d[: edit[1] % n]
        elif kind in ("flip", "flip_head"):
            if d:
                p = edit[1] % (len(d) if kind == "flip" else min(len(d), 256))
                d[p] ^= 1 << edit[2]
        elif kind == "byte":
            if d:
                d[edit[1] % len(d)] = edit[2]
        elif kind in ("int", "int_head"):
            fmt_ = edit[3]
            size = struct.calcsize(fmt_)
            p = edit[1] % (n if kind == "int" else min(n, 256))
            d[p : p + size] = struct.pack(fmt_, edit[2] % (1 << (8 * size)))
        elif kind == "insert":
            p = edit[1] % (len(d) + 1)
            d[p:p] = edit[2]
        elif kind == "delete":
            p = edit[1] % n
            del d[p : p + edit[2]]
        elif kind == "append":
            d += edit[1]
        elif kind == "duplicate":
            src = edit[2] % n
            p = edit[1] % (len(d) + 1)
            d[p:p] = d[src : src + edit[3]]
    return bytes(d)


# =========================================================================== idx
IDX_IMAGES = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
IDX_LABELS = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)


def idx_oracle(content: bytes, ndim: int) -> np.ndarray | None:
    """An independent decoding of an idx file (None: invalid)."""
    if len(content) < 4 + 4 * ndim or content[:4] != bytes([0, 0, 8, ndim]):
        return None
    dims = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
    payload = content[4 + 4 * ndim :]
    if len(payload) != math.prod(dims):
        return None
    return np.frombuffer(payload, np.uint8).reshape(dims)


def check_idx(tmp_path: Path, blob: bytes, ndim: int, gz: bool) -> None:
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(blob)
    if gz:
        try:
            content = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error):
            content = None
    else:
        content = blob
    expected = idx_oracle(content, ndim) if content is not None else None
    with memory_bound(16 << 20):
        try:
            got = read_idx(path, ndim)
        except DataError as exc:
            one_line(exc)
            got = None
    if got is None:
        assert expected is None or (gz and content is None), "read_idx refused a valid idx file"
    else:
        assert expected is not None, "read_idx accepted an invalid idx file"
        assert got.shape == expected.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)
        if content != (gzip.decompress(blob) if gz else blob):
            SILENT["idx"] += 1


def _fuzz_idx_mutations(tmp_path, edits, gz, labels):
    COUNTS["idx (mutated files)"] += 1
    array = IDX_LABELS if labels else IDX_IMAGES
    raw = idx_bytes(array)
    blob = mutate(gzip.compress(raw, mtime=0) if gz else raw, edits)
    check_idx(tmp_path, blob, array.ndim, gz)


_idx_headers = st.tuples(
    st.one_of(st.just(b"\x00\x00\x08\x03"), st.just(b"\x00\x00\x08\x01"), st.binary(min_size=0, max_size=4)),
    st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 65536])), min_size=0, max_size=4),
    st.integers(0, 80),
    st.booleans(),
)


def _fuzz_idx_structured(tmp_path, header, ndim):
    COUNTS["idx (generated headers)"] += 1
    magic, dims, payload, gz = header
    blob = magic + b"".join(struct.pack(">I", d) for d in dims) + bytes(range(payload % 256)) * (payload // 256 + 1)
    blob = blob[: len(magic) + 4 * len(dims) + payload]
    check_idx(tmp_path, gzip.compress(blob, mtime=0) if gz else blob, ndim, gz)


@fast
@given(edits=EDITS, gz=st.booleans(), labels=st.booleans())
def test_fuzz_idx_mutations(tmp_path, edits, gz, labels):
    _fuzz_idx_mutations(tmp_path, edits, gz, labels)


@fast
@given(header=_idx_headers, ndim=st.sampled_from([1, 3]))
def test_fuzz_idx_generated_headers(tmp_path, header, ndim):
    _fuzz_idx_structured(tmp_path, header, ndim)


@pytest.mark.slow
@slow
@given(edits=EDITS, gz=st.booleans(), labels=st.booleans())
def test_fuzz_idx_mutations_long(tmp_path, edits, gz, labels):
    _fuzz_idx_mutations(tmp_path, edits, gz, labels)


@pytest.mark.slow
@slow
@given(header=_idx_headers, ndim=st.sampled_from([1, 3]))
def test_fuzz_idx_generated_headers_long(tmp_path, header, ndim):
    _fuzz_idx_structured(tmp_path, header, ndim)


# =========================================================================== CIFAR pickles
CIFAR_DATA = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
CIFAR_SEEDS = {
    "py2": py2_pickle({"batch_label": "b", "data": CIFAR_DATA, "labels": [3, 7], "filenames": ["a.png", "b.png"]}),
    "py3": pickle.dumps({b"data": CIFAR_DATA, b"labels": [3, 7]}, protocol=4),
    "meta": py2_pickle({"label_names": ["a", "b", "c"], "num_vis": 3072}),
}


def check_cifar_blob(blob: bytes) -> None:
    """_safe_unpickle + the batch checks: DataError or a consistent batch; memory ∝ the blob."""
    with memory_bound(8 * len(blob) + (2 << 20)):
        try:
            entries = D._safe_unpickle(blob, "fuzz")
            images, labels = D._cifar_batch(entries, "fuzz", "labels", 10)
        except DataError as exc:
            one_line(exc)
            return
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and len(images) == len(labels)
    assert labels.dtype == np.int64 and (labels.size == 0 or 0 <= labels.min() <= labels.max() < 10)


def _fuzz_cifar_mutations(edits, seed):
    COUNTS["CIFAR pickle (mutated)"] += 1
    check_cifar_blob(mutate(CIFAR_SEEDS[seed], edits))


# ---- a small pickle assembler: programs of opcodes with arguments that may lie about lengths
_P = pickle
_GLOBALS = [
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("numpy", "dtype"), ("os", "system"), ("builtins", "eval"), ("posix", "system"), ("numpy", "frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"), ("builtins", "getattr"), ("copyreg", "_reconstructor"),
]
_DTYPE_SPECS = [b"u1", b"i1", b"u8", b"f4", b"O8", b"V8", b"U4", b"S2", b"b1", b"c8", b"M8", b"u1,u1", b"(2,2)u1"]
_LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([255, 256, 3072, 6144, 2**31 - 1, 2**32 - 1, 2**40, 2**63]))


def _array_program(draw_shape, dtype_spec, raw_len, flags, fortran, order):
    """A numpy-style `_reconstruct(ndarray, (0,), b'b')` + BUILD with the given state."""
    shape = b"(" + b"".join(b"J" + struct.pack("<i", s % 2**31) for s in draw_shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + b"X" + struct.pack("<I", len(dtype_spec)) + dtype_spec + b"\x89\x88\x87R"
             + b"(K\x03X\x01\x00\x00\x00" + order + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffJ" + struct.pack("<i", flags) + b"tb")
    raw = b"C" + bytes([min(raw_len, 255)]) + bytes(min(raw_len, 255)) if raw_len < 256 else (
        b"B" + struct.pack("<I", raw_len % 2**32) + bytes(min(raw_len, 6144)))
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            + b"(K\x01" + shape + dtype + (b"\x88" if fortran else b"\x89") + raw + b"tb")


_OP = st.one_of(
    st.tuples(st.just("int"), st.integers(-(2**40), 2**40)),
    st.tuples(st.just("bytes"), _LENGTHS, st.integers(0, 300)),
    st.tuples(st.just("bytes8"), _LENGTHS, st.integers(0, 300)),
    st.tuples(st.just("unicode8"), _LENGTHS, st.integers(0, 300)),
    st.tuples(st.just("str"), st.text(max_size=8)),
    st.tuples(st.just("global"), st.sampled_from(_GLOBALS)),
    st.tuples(st.just("stack_global"), st.sampled_from(_GLOBALS)),
    st.tuples(st.just("array"), st.lists(st.one_of(st.integers(0, 4), st.sampled_from([3072, 2**31 - 1])), max_size=3),
              st.sampled_from(_DTYPE_SPECS), _LENGTHS, st.sampled_from([0, 1, 0x3F, -1]), st.booleans(),
              st.sampled_from([b"|", b"<", b">", b"="])),
    st.tuples(st.just("get"), st.integers(0, 8)),
    st.tuples(st.just("frame"), _LENGTHS),
    st.sampled_from([("raw", op) for op in [
        _P.MARK, _P.TUPLE, _P.TUPLE1, _P.TUPLE2, _P.TUPLE3, _P.EMPTY_LIST, _P.APPEND, _P.APPENDS, _P.EMPTY_DICT,
        _P.SETITEM, _P.SETITEMS, _P.REDUCE, _P.BUILD, _P.NEWOBJ, _P.MEMOIZE, _P.POP, _P.DUP, _P.NONE,
        _P.NEWTRUE, _P.EMPTY_TUPLE, _P.LIST, _P.DICT, _P.POP_MARK, _P.EMPTY_SET, _P.ADDITEMS, _P.OBJ,
        _P.PERSID + b"x\n", _P.EXT1 + b"\x01", b"\xff", _P.LONG + b"9" * 5000 + b"L\n",
    ]]),
)


def assemble(ops, proto: int, stop: bool) -> bytes:
    out = bytearray(b"\x80" + bytes([proto]))
    for op in ops:
        kind = op[0]
        if kind == "int":
            out += b"\x8a" + bytes([8]) + op[1].to_bytes(8, "little", signed=True)
        elif kind in ("bytes", "bytes8", "unicode8"):
            declared, real = op[1], op[2]
            code, fmt_ = {"bytes": (b"B", "<I"), "bytes8": (b"\x8e", "<Q"), "unicode8": (b"\x8d", "<Q")}[kind]
            out += code + struct.pack(fmt_, declared % (1 << (8 * struct.calcsize(fmt_)))) + b"a" * real
        elif kind == "str":
            raw = op[1].encode()
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif kind == "global":
            out += b"c" + op[1][0].encode() + b"\n" + op[1][1].encode() + b"\n"
        elif kind == "stack_global":
            for part in op[1]:
                raw = part.encode()
                out += b"\x8c" + bytes([len(raw)]) + raw
            out += b"\x93"
        elif kind == "array":
            out += _array_program(*op[1:])
        elif kind == "get":
            out += b"h" + bytes([op[1]])
        elif kind == "frame":
            out += b"\x95" + struct.pack("<Q", op[1] % 2**64)
        else:
            out += op[1]
    if stop:
        out += b"."
    return bytes(out)


_PROGRAM = st.tuples(st.lists(_OP, max_size=24), st.integers(0, 5), st.booleans())


def _fuzz_cifar_programs(program):
    COUNTS["CIFAR pickle (generated opcode programs)"] += 1
    ops, proto, stop = program
    # half the programs build the expected dict around the generated value, so deep states are reached
    body = assemble(ops, proto, False)
    wrapped = (b"\x80\x02}(C\x04data" + body[2:] + b"C\x06labels]K\x03a" + b"u.")
    check_cifar_blob(assemble(ops, proto, stop))
    check_cifar_blob(wrapped)


@fast
@given(edits=EDITS, seed=st.sampled_from(sorted(CIFAR_SEEDS)))
def test_fuzz_cifar_pickle_mutations(edits, seed):
    _fuzz_cifar_mutations(edits, seed)


@fast
@given(program=_PROGRAM)
def test_fuzz_cifar_pickle_programs(program):
    _fuzz_cifar_programs(program)


@pytest.mark.slow
@slow
@given(edits=EDITS, seed=st.sampled_from(sorted(CIFAR_SEEDS)))
def test_fuzz_cifar_pickle_mutations_long(edits, seed):
    _fuzz_cifar_mutations(edits, seed)


@pytest.mark.slow
@slow
@given(program=_PROGRAM)
def test_fuzz_cifar_pickle_programs_long(program):
    _fuzz_cifar_programs(program)


def test_cifar_stub_arrays_match_numpy():
    """The stand-ins rebuild exactly what numpy's own unpickling gives, for every byte order and layout."""
    for array in [CIFAR_DATA, CIFAR_DATA.astype(">u8"), np.asfortranarray(CIFAR_DATA[:, :6].astype("<f4")),
                  np.zeros((0, 3072), np.uint8), np.arange(5, dtype=np.int64)]:
        for blob in (py2_pickle({"data": array}), pickle.dumps({b"data": array}, protocol=4)):
            got = D._safe_unpickle(blob, "x")["data"]
            assert got.dtype == array.dtype.newbyteorder("=") and got.flags.writeable
            np.testing.assert_array_equal(got, array)


# ---- CIFAR tarballs (the tar layer: headers, sizes, gzip)
@functools.lru_cache(maxsize=None)
def _cifar_tarball() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = make_cifar10(Path(tmp), per_batch=1, n_test=2)
        return path.read_bytes()


@functools.lru_cache(maxsize=None)
def _scipy_svhn() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = make_svhn(Path(tmp), "test", n=2)
        return path.read_bytes()


def _fuzz_cifar_tar(tmp_path, edits, layer):
    COUNTS["CIFAR tar.gz (mutated)"] += 1
    good = _cifar_tarball()
    blob = mutate(good, edits) if layer == "gz" else gzip.compress(mutate(gzip.decompress(good), edits), mtime=0)
    root = tmp_path / "c"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(blob)
    with memory_bound(64 << 20):
        try:
            ds = load_dataset("cifar10", "test", data_dir=root, download=False)
        except DataError as exc:
            one_line(exc)
            return
    assert ds.images.shape[1:] == (3, 32, 32) and len(ds.labels) == len(ds.images)


@fast
@given(edits=EDITS, layer=st.sampled_from(["gz", "tar"]))
def test_fuzz_cifar_tarball(tmp_path_factory, edits, layer):
    _fuzz_cifar_tar(tmp_path_factory.mktemp("tar"), edits, layer)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES // 4, **_COMMON)
@given(edits=EDITS, layer=st.sampled_from(["gz", "tar"]))
def test_fuzz_cifar_tarball_long(tmp_path_factory, edits, layer):
    _fuzz_cifar_tar(tmp_path_factory.mktemp("tar"), edits, layer)


# =========================================================================== SVHN .mat
def mat_element(type_: int, payload: bytes, declared: int | None = None, pad: bool = True) -> bytes:
    size = len(payload) if declared is None else declared
    return struct.pack("<II", type_, size % 2**32) + payload + (b"\0" * (-len(payload) % 8) if pad else b"")


def mat_matrix(name: bytes, cls: int, dims, data_type: int, data: bytes, flags: int = 0, declared=None) -> bytes:
    body = (mat_element(6, struct.pack("<II", cls | flags, 0)) + mat_element(5, struct.pack(f"<{len(dims)}i", *dims))
            + mat_element(1, name) + mat_element(data_type, data, declared))
    return mat_element(14, body)


def mat_file(*elements: bytes, version: int = 0x0100, endian: bytes = b"IM") -> bytes:
    text = b"MATLAB 5.0 MAT-file, written by onebit's tests".ljust(116, b" ")
    return text + b"\0" * 8 + struct.pack("<H", version) + endian + b"".join(elements)


def svhn_mat(n: int = 3, compress: bool = False) -> bytes:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.float64)
    elements = [mat_matrix(b"X", 9, x.shape, 2, x.tobytes(order="F")), mat_matrix(b"y", 6, (n, 1), 2, y.astype(np.uint8).tobytes())]
    if compress:
        elements = [mat_element(15, zlib.compress(e), pad=False) for e in elements]
    return mat_file(*elements)


def check_svhn(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "test_32x32.mat").write_bytes(blob)
    with memory_bound(16 * len(blob) + (8 << 20)):
        try:
            ds = load_dataset("svhn", "test", data_dir=tmp_path, download=False)
        except DataError as exc:
            one_line(exc)
            return
    assert ds.images.shape[1:] == (3, 32, 32) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and (ds.labels.size == 0 or 0 <= ds.labels.min() <= ds.labels.max() <= 9)


def _fuzz_svhn_mutations(tmp_path, edits, source):
    COUNTS["SVHN .mat (mutated)"] += 1
    if source == "scipy":
        good = _scipy_svhn()
    else:
        good = svhn_mat(2, compress=source == "compressed")
    check_svhn(tmp_path, mutate(good, edits))


_MAT_ELEMENT = st.tuples(
    st.sampled_from([1, 2, 5, 6, 7, 9, 12, 13, 14, 15, 0, 3, 8, 10, 11, 16, 17, 18, 19, 20, 130, 255, 2**31]),  # data type
    st.sampled_from([6, 7, 8, 9, 1, 2, 4, 5, 0, 16, 255]),  # class
    st.lists(st.one_of(st.integers(0, 40), st.sampled_from([-1, 2**31 - 1, 65536])), min_size=0, max_size=5),  # dims
    st.integers(0, 4000),  # real payload bytes
    st.one_of(st.none(), _LENGTHS),  # declared size (None: the real one)
    st.sampled_from([b"X", b"y", b"z", b"", b"\xff"]),
    st.sampled_from([0, 0x0800, 0x0200]),  # flags: complex, logical
    st.booleans(),  # compress
)


def _fuzz_svhn_generated(tmp_path, elements, version, endian):
    COUNTS["SVHN .mat (generated elements)"] += 1
    parts = []
    for type_, cls, dims, size, declared, name, flags, compress in elements:
        element = mat_matrix(name, cls, dims, type_, bytes(size % 251 for size in range(size)), flags, declared)
        parts.append(mat_element(15, zlib.compress(element), pad=False) if compress else element)
    blob = mat_file(*parts, version=version, endian=endian)
    check_svhn(tmp_path, blob)
    with memory_bound(16 * len(blob) + (8 << 20)):
        try:
            read_mat(tmp_path / "test_32x32.mat", ["X", "y", "z"])
        except DataError as exc:
            one_line(exc)


_MAT_FILE = dict(elements=st.lists(_MAT_ELEMENT, max_size=3), version=st.sampled_from([0x0100, 0x0200, 0]),
                 endian=st.sampled_from([b"IM", b"IM", b"MI", b"XX"]))


@fast
@given(edits=EDITS, source=st.sampled_from(["scipy", "plain", "compressed"]))
def test_fuzz_svhn_mutations(tmp_path_factory, edits, source):
    _fuzz_svhn_mutations(tmp_path_factory.mktemp("svhn"), edits, source)


@fast
@given(**_MAT_FILE)
def test_fuzz_svhn_generated(tmp_path_factory, elements, version, endian):
    _fuzz_svhn_generated(tmp_path_factory.mktemp("svhn"), elements, version, endian)


@pytest.mark.slow
@slow
@given(edits=EDITS, source=st.sampled_from(["scipy", "plain", "compressed"]))
def test_fuzz_svhn_mutations_long(tmp_path_factory, edits, source):
    _fuzz_svhn_mutations(tmp_path_factory.mktemp("svhn"), edits, source)


@pytest.mark.slow
@slow
@given(**_MAT_FILE)
def test_fuzz_svhn_generated_long(tmp_path_factory, elements, version, endian):
    _fuzz_svhn_generated(tmp_path_factory.mktemp("svhn"), elements, version, endian)


def test_svhn_reader_matches_scipy(tmp_path):
    """Our .mat reader decodes what scipy writes exactly as scipy reads it (plain and compressed)."""
    import scipy.io

    rng = np.random.default_rng(2)
    variables = {"X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": np.array([[10], [1], [2], [9]], np.float64),
                 "other": rng.normal(size=(2, 3, 4)).astype(np.float32), "n": np.arange(6, dtype=np.int16).reshape(2, 3)}
    for compress in (False, True):
        path = tmp_path / f"m{int(compress)}.mat"
        scipy.io.savemat(path, variables, do_compression=compress)
        ours = read_mat(path, list(variables))
        theirs = scipy.io.loadmat(path)
        for name in variables:
            assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
            np.testing.assert_array_equal(ours[name], theirs[name])
        path.replace(tmp_path / "test_32x32.mat")
        ds = load_dataset("svhn", "test", data_dir=tmp_path)
        np.testing.assert_array_equal(ds.labels, [0, 1, 2, 9])
        np.testing.assert_array_equal(ds.images[1, 2], variables["X"][:, :, 2, 1])


# =========================================================================== .onebit
def _tiny_cnn_file(tmp_path: Path) -> Path:
    from onebit.export import export_model
    from onebit.models import create_model

    torch.manual_seed(0)
    model = create_model("binarynet_cnn", in_shape=(1, 8, 8), num_classes=3, channels=(8, 8, 8), fc_units=8).eval()
    path = tmp_path / "cnn.onebit"
    export_model(model, path, source={"name": "binarynet_cnn"})
    return path


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> tuple[bytes, np.ndarray, np.ndarray]:
    path = _tiny_cnn_file(tmp_path_factory.mktemp("onebit"))
    x = np.random.default_rng(3).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    return path.read_bytes(), x, load(path).predict(x)


@pytest.fixture(scope="module")
def wrn_file(tmp_path_factory) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A residual graph (input/inputs, add, avgpool, pad_channels) as the mutation seed."""
    from onebit.export import export_model
    from onebit.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onebit") / "wrn.onebit"
    export_model(create_model("wrn_1bit", in_shape=(1, 8, 8), num_classes=3, depth=8, width=0.25).eval(), path)
    x = np.random.default_rng(3).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    return path.read_bytes(), x, load(path).predict(x)


def _fuzz_onebit_mutations(tmp_path, cnn_file, edits):
    COUNTS[".onebit (mutated)"] += 1
    good, x, expected = cnn_file
    blob = mutate(good, edits)
    path = tmp_path / "m.onebit"
    path.write_bytes(blob)
    with memory_bound(4 * len(blob) + (4 << 20)):
        try:
            model = load(path)
        except FormatError as exc:
            one_line(exc)
            return
    # every byte is checksummed: whatever loads computes exactly what the original computes
    np.testing.assert_array_equal(model.predict(x), expected)
    if blob != good:
        SILENT[".onebit"] += 1


@fast
@given(edits=EDITS)
def test_fuzz_onebit_mutations(tmp_path_factory, cnn_file, edits):
    _fuzz_onebit_mutations(tmp_path_factory.mktemp("m"), cnn_file, edits)


@pytest.mark.slow
@slow
@given(edits=EDITS)
def test_fuzz_onebit_mutations_long(tmp_path_factory, cnn_file, edits):
    _fuzz_onebit_mutations(tmp_path_factory.mktemp("m"), cnn_file, edits)


@fast
@given(edits=EDITS)
def test_fuzz_onebit_residual_mutations(tmp_path_factory, wrn_file, edits):
    _fuzz_onebit_mutations(tmp_path_factory.mktemp("m"), wrn_file, edits)


@pytest.mark.slow
@slow
@given(edits=EDITS)
def test_fuzz_onebit_residual_mutations_long(tmp_path_factory, wrn_file, edits):
    _fuzz_onebit_mutations(tmp_path_factory.mktemp("m"), wrn_file, edits)


# ---- graphs generated from scratch, written with valid checksums (what an attacker can do)
_HOSTILE_INT = st.sampled_from([0, -1, 2**31 - 1, 2**31, 10**6, 65, 64, True])


def _small(draw, low=1, high=3, chaos=True):
    """A small valid int; in a chaotic graph sometimes a hostile one."""
    if not chaos:
        return draw(st.integers(low, high))
    return draw(st.one_of(st.integers(low, high), st.integers(low, high), st.integers(low, high), _HOSTILE_INT))


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    chaos = draw(st.integers(0, 9)) < 4  # 40%: hostile numbers and mismatched shapes; else a valid graph
    spatial = draw(st.booleans())
    input_shape = [draw(st.integers(1, 70))] if not spatial else [draw(st.integers(1, 5)), draw(st.integers(1, 7)), draw(st.integers(1, 7))]
    value = ["float", (input_shape[1], input_shape[2], input_shape[0]) if spatial else (input_shape[0],), False]
    model_input = tuple(value)
    layers, tensors = [], {}
    history = []  # (kind, shape, scaled) of each layer's output: partners for add

    def words(bits):
        return -(-bits // 64)

    def add(op, params=None, **named):
        index = len(layers)
        names = {}
        for role, array in named.items():
            names[role] = f"t{index}.{role}"
            tensors[names[role]] = array
        layers.append({"op": op, "name": f"l{index}", "params": params or {}, "tensors": names})

    def shape_of(shape):  # usually right, sometimes off by one somewhere
        shape = list(shape)
        if chaos and draw(st.integers(0, 9)) == 0 and shape:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1])))
        return tuple(shape)

    def ints32(n):
        return rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32) if draw(st.booleans()) else rng.integers(-40, 40, n).astype(np.int32)

    def floats(n):
        a = rng.normal(size=n).astype(np.float32) * np.float32(10.0 ** draw(st.integers(-3, 3)))
        if chaos and draw(st.integers(0, 9)) == 0:
            a[0] = draw(st.sampled_from([np.nan, np.inf, 3e38]))
        return a.astype(np.float32)

    def directions(n):
        return rng.integers(-1, 2, n).astype(np.int8) if not chaos or draw(st.integers(0, 9)) else np.full(n, 2, np.int8)

    def dense(binary):
        out = _small(draw, 1, 70, chaos)
        out_n = out if type(out) is int and 0 < out < 200 else 3
        k = math.prod(value[1])
        if binary:
            add("dense", {"out_features": out, "weights": "binary"}, weight=rng.integers(0, 2**64, shape_of((out_n, words(k))), dtype=np.uint64))
            value[:] = ["int" if value[0] == "bits" else "float", (out_n,), value[2]]
        else:
            add("dense", {"out_features": out, "weights": "float"}, weight=rng.normal(size=shape_of((out_n, k))).astype(np.float32))
            value[:] = ["float", (out_n,), False]

    def conv(binary):
        h, w, c = value[1] if len(value[1]) == 3 else (1, 1, value[1][0])
        out = _small(draw, 1, 70, chaos)
        out_n = out if type(out) is int and 0 < out < 200 else 3
        ph, pw = _small(draw, 1, 2, chaos) - 1, _small(draw, 1, 2, chaos) - 1
        kh = _small(draw, 1, max(1, min(h + 2 * ph, 3)), chaos)
        kw = _small(draw, 1, max(1, min(w + 2 * pw, 3)), chaos)
        sh, sw = _small(draw, 1, 3, chaos), _small(draw, 1, 3, chaos)
        if value[0] == "bits":
            pad = draw(st.sampled_from([0, 1, -1] + ([0.5] if chaos else [])))
        else:
            pad = draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, -3.25] + ([float("nan"), 1e39] if chaos else [])))
        khn, kwn = (kh if type(kh) is int and 0 < kh < 9 else 1), (kw if type(kw) is int and 0 < kw < 9 else 1)
        last = words(c) if binary else c
        weight = (rng.integers(0, 2**64, shape_of((out_n, khn, kwn, last)), dtype=np.uint64) if binary
                  else rng.normal(size=shape_of((out_n, khn, kwn, last))).astype(np.float32))
        params = {"out_channels": out, "weights": "binary" if binary else "float", "kernel": [kh, kw],
                  "stride": [sh, sw], "padding": [ph, pw], "pad_value": pad}
        add("conv", params, weight=weight)
        try:
            ho = (h + 2 * ph - kh) // sh + 1
            wo = (w + 2 * pw - kw) // sw + 1
        except (TypeError, ZeroDivisionError):
            ho = wo = 1
        # hostile numbers make the graph invalid anyway: keep tracking something small
        ho, wo = (ho if 0 < ho <= 64 else 1), (wo if 0 < wo <= 64 else 1)
        value[:] = ["int" if value[0] == "bits" else "float", (ho, wo, out_n), value[2]]

    def pool(op):
        h, w, c = value[1] if len(value[1]) == 3 else (1, 1, value[1][0])
        kh, kw = _small(draw, 1, min(h, 3), chaos), _small(draw, 1, min(w, 3), chaos)
        sh, sw = _small(draw, 1, 3, chaos), _small(draw, 1, 3, chaos)
        ph = draw(st.integers(0, kh // 2)) if not chaos else _small(draw, 1, 2, chaos) - 1
        pw = draw(st.integers(0, kw // 2)) if not chaos else _small(draw, 1, 2, chaos) - 1
        add(op, {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw]})
        if op == "avgpool":
            value[:] = ["float", value[1], False]
        try:
            ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        except (TypeError, ZeroDivisionError):
            ho = wo = 1
        value[1] = (ho if 0 < ho <= 64 else 1, wo if 0 < wo <= 64 else 1, c)

    for _ in range(draw(st.integers(0, 6))):
        kind, shape, scaled = value
        spatial_now = len(shape) == 3
        choices = ["flatten", "clamp"]
        if kind == "float" and not scaled:
            choices += ["binarize", "threshold", "affine", "conv_float" if spatial_now else "dense_float", "conv_real_binary" if spatial_now else "dense_real_binary"]
        if kind == "bits":
            choices += ["conv_binary" if spatial_now else "dense_binary"]
        if kind == "int":
            choices += ["affine"] + ([] if scaled else ["threshold"])
        if spatial_now:
            choices += ["maxpool"]
        if kind == "float" and not scaled:
            choices += ["add"] + (["avgpool", "pad_channels"] if spatial_now else [])
        if chaos and draw(st.integers(0, 4)) == 0:  # an op that does not fit
            choices = ["flatten", "binarize", "threshold", "affine", "conv_binary", "dense_binary", "maxpool", "clamp",
                       "avgpool", "pad_channels", "add", "softmax"]
        op = draw(st.sampled_from(choices))
        c = shape[-1]
        if op == "flatten":
            add("flatten")
            value[1] = (math.prod(shape),)
        elif op == "clamp":
            lo = draw(st.sampled_from([None, -1.0, 0.0, -5]))
            hi = draw(st.sampled_from([None, 1.0, 2.5, -2.0]))
            add("clamp", {"min": lo, "max": hi})
        elif op == "binarize":
            add("binarize", {"scale": draw(st.sampled_from(["none", "mean_abs"]))})
            value[:] = ["bits", shape, layers[-1]["params"]["scale"] == "mean_abs"]
        elif op == "threshold":
            add("threshold", threshold=ints32(c) if kind == "int" else floats(c), direction=directions(c))
            value[:] = ["bits", shape, False]
        elif op == "affine":
            add("affine", {"sample_scale": scaled}, mul=floats(c), add=floats(c))
            value[:] = ["float", shape, False]
        elif op in ("dense_float", "dense_real_binary", "dense_binary"):
            dense(binary=op != "dense_float")
        elif op in ("conv_float", "conv_real_binary", "conv_binary"):
            conv(binary=op != "conv_float")
        elif op in ("maxpool", "avgpool"):
            pool(op)
        elif op == "pad_channels":
            extra = _small(draw, 1, 3, chaos)
            add("pad_channels", {"extra": extra})
            if len(shape) == 3:
                value[1] = shape[:2] + (c + (extra if type(extra) is int and 0 < extra < 9 else 1),)
        elif op == "add":  # a residual connection: the value plus an earlier one like it (or, chaotic, any)
            partners = [i for i, seen in enumerate(history) if seen == tuple(value)]
            partners += [-1] if model_input == tuple(value) else []
            wild = chaos and draw(st.integers(0, 3)) == 0
            partner = draw(st.integers(-3, len(layers) + 1)) if wild or not partners else draw(st.sampled_from(partners))
            layers.append({"op": "add", "name": f"l{len(layers)}", "params": {}, "tensors": {},
                           "inputs": [len(layers) - 1, partner]})
        else:
            add(op)
        if chaos and op != "add" and draw(st.integers(0, 9)) == 0:  # read some other value, maybe none that exists
            layers[-1]["input"] = draw(st.integers(-3, len(layers)))
        history.append(tuple(value))
    # finish with float logits
    classes = draw(st.integers(1, 5))
    if len(value[1]) == 3:
        add("flatten")
        value[1] = (math.prod(value[1]),)
    if value[0] == "bits":
        k = value[1][0]
        add("dense", {"out_features": classes, "weights": "binary"}, weight=rng.integers(0, 2**64, (classes, words(k)), dtype=np.uint64))
        value[0] = "int"
    if value[0] == "int":
        add("affine", {"sample_scale": value[2]}, mul=floats(value[1][0]), add=floats(value[1][0]))
        value[:] = ["float", value[1], False]
    if value[1][0] != classes:
        add("dense", {"out_features": classes, "weights": "float"}, weight=rng.normal(size=(classes, value[1][0])).astype(np.float32))
    meta = {"input_shape": input_shape, "num_classes": classes, "layers": layers, "format": "onebit",
            "format_version": fmt.FORMAT_VERSION, "conventions": dict(fmt.CONVENTIONS), "onebit_version": "fuzz"}
    special = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf, -0.0, 0.0]))
    return meta, tensors, special, draw(st.integers(0, 3))


@pytest.fixture
def all_paths(restore_kernel_path):
    return kernels.available_paths()


def _fuzz_onebit_graphs(tmp_path, all_paths, graph):
    COUNTS[".onebit (generated graphs, valid checksums)"] += 1
    meta, tensors, special, batch = graph
    path = tmp_path / "g.onebit"
    try:
        fmt._write_raw(path, meta, tensors)
    except (FormatError, ValueError):  # the writer refuses NaN in JSON: not the reader's business
        return
    results = []
    for kernel_path in all_paths:
        kernels.set_path(kernel_path)
        try:
            model = load(path, threads=2)
        except FormatError as exc:
            one_line(exc)
            return
        rng = np.random.default_rng(batch)
        x = rng.uniform(-2, 2, (batch, *model.input_shape)).astype(np.float32)
        if special is not None and x.size:
            x.reshape(-1)[:: 3] = special
        out = model.predict(x)  # a validated graph must run: any exception here is a bug
        if kernel_path == all_paths[0]:
            COUNTS[".onebit graphs that loaded and ran (subset)"] += 1
        assert out.dtype == np.float32 and out.shape == (batch, model.num_classes)
        results.append(out)
    for kernel_path, out in zip(all_paths[1:], results[1:]):  # every kernel path computes the same bits
        np.testing.assert_array_equal(out, results[0], err_msg=f"{kernel_path} vs {all_paths[0]}")


@fast
@given(graph=graphs())
def test_fuzz_onebit_generated_graphs(tmp_path_factory, all_paths, graph):
    _fuzz_onebit_graphs(tmp_path_factory.mktemp("g"), all_paths, graph)


@pytest.mark.slow
@slow
@given(graph=graphs())
def test_fuzz_onebit_generated_graphs_long(tmp_path_factory, all_paths, graph):
    _fuzz_onebit_graphs(tmp_path_factory.mktemp("g"), all_paths, graph)


def test_sanitized_build_is_the_one_imported():
    """Under fuzz/asan_engine_tests.sh the ASan/UBSan build of the kernels must be what runs."""
    if not os.environ.get("ONEBIT_EXPECT_SANITIZED"):
        pytest.skip("only under fuzz/asan_engine_tests.sh")
    assert kernels.native_available()
    assert "build/asan/site" in kernels._native.__file__


# =========================================================================== checkpoints
def _checkpoint_state() -> dict:
    from onebit.models import create_model

    torch.manual_seed(0)
    model = create_model("binarynet_mlp", in_shape=(1, 8, 8), num_classes=10, hidden=8, depth=1)
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_name": "binarynet_mlp",
            "model_kwargs": {"in_shape": [1, 8, 8], "num_classes": 10, "hidden": 8, "depth": 1},
            "config": {"epochs": 1}, "model_state": model.state_dict(), "epoch": 1, "rng_state": torch.get_rng_state()}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    state = _checkpoint_state()
    torch.save(state, path)
    return path.read_bytes(), state


def _same_state(a: dict, b: dict) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y

    return same(a, b)


@functools.lru_cache(maxsize=None)
def _load_checkpoint_checks_crcs() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        state = _checkpoint_state()
        torch.save(state, path)
        good = path.read_bytes()
        raw = next(v for v in state["model_state"].values() if v.dtype == torch.float32 and v.numel() >= 8).numpy().tobytes()
        damaged = bytearray(good)
        damaged[good.find(raw) + 5] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            load_checkpoint(path)
        except CheckpointError:
            return True
        return False


def _fuzz_checkpoint(tmp_path, checkpoint_bytes, edits):
    COUNTS["checkpoint (mutated)"] += 1
    good, state = checkpoint_bytes
    blob = mutate(good, edits)
    path = tmp_path / "last.pt"
    path.write_bytes(blob)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        one_line(exc)
        return
    assert isinstance(loaded, dict)
    if not _same_state(loaded, state):
        SILENT["checkpoint"] += 1
        # torch's zip reader does not check CRCs; until train.load_checkpoint does (see
        # test_checkpoint_payload_bit_flip_is_detected) such files are counted, not failed
        assert not _load_checkpoint_checks_crcs(), "load_checkpoint accepted a damaged checkpoint"


@fast
@given(edits=EDITS)
def test_fuzz_checkpoint_mutations(tmp_path_factory, checkpoint_bytes, edits):
    _fuzz_checkpoint(tmp_path_factory.mktemp("c"), checkpoint_bytes, edits)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES // 2, **_COMMON)
@given(edits=EDITS)
def test_fuzz_checkpoint_mutations_long(tmp_path_factory, checkpoint_bytes, edits):
    _fuzz_checkpoint(tmp_path_factory.mktemp("c"), checkpoint_bytes, edits)


def test_checkpoint_payload_bit_flip_is_detected(tmp_path, checkpoint_bytes):
    good, state = checkpoint_bytes
    raw = next(v for v in state["model_state"].values() if v.dtype == torch.float32 and v.numel() >= 8).numpy().tobytes()
    at = good.find(raw)
    assert at > 0
    damaged = bytearray(good)
    damaged[at + 5] ^= 0x10
    (tmp_path / "last.pt").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "last.pt")


def test_zip_integrity_helper_flags_every_payload_flip(tmp_path, checkpoint_bytes):
    """The check the fix of load_checkpoint needs: a flipped bit in any record's data is found."""
    import zipfile

    from onebit.files import zip_integrity_error

    good, _ = checkpoint_bytes
    (tmp_path / "good.pt").write_bytes(good)
    assert zip_integrity_error(tmp_path / "good.pt") is None
    spans = []
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack_from("<HH", good, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, start + info.compress_size))
    rng = np.random.default_rng(0)
    offsets = [int(rng.integers(a, b)) for a, b in spans if b > a] + [int(o) for o in rng.choice(len(good), 40, replace=False)]
    for offset in offsets:
        damaged = bytearray(good)
        damaged[offset] ^= 1 << int(rng.integers(8))
        (tmp_path / "bad.pt").write_bytes(bytes(damaged))
        problem = zip_integrity_error(tmp_path / "bad.pt")
        if any(a <= offset < b for a, b in spans):
            assert problem is not None, f"flip at {offset} inside a record's data not detected"
        if problem is not None:
            assert "\n" not in problem


# =========================================================================== no code execution from files
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_in_cifar_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, 4, 5):
        evil = pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=protocol)
        make_cifar10(tmp_path / f"c{protocol}", packed=protocol % 4 == 0, overrides={"test_batch": evil})
        with pytest.raises(DataError, match="refusing to load global") as err:
            load_dataset("cifar10", "test", data_dir=tmp_path / f"c{protocol}")
        one_line(err.value)
        assert not marker.exists()


@pytest.mark.parametrize("container", ["torch.save", "plain pickle", "inside a valid checkpoint"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    if container == "torch.save":
        torch.save(_Evil(marker), path)
    elif container == "plain pickle":
        path.write_bytes(pickle.dumps(_Evil(marker)))
    else:
        state = _checkpoint_state()
        state["config"] = {"epochs": _Evil(marker)}
        torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    one_line(err.value)
    assert not marker.exists()


# =========================================================================== regressions: bugs fuzzing found
def test_regression_svhn_bad_element_type_does_not_crash(tmp_path):
    """scipy.io.loadmat segfaulted on a one-bit flip of a data element's type (2 → 130): its
    compiled reader indexes a fixed table with the type read from the file. The SVHN reader
    now parses MAT files itself (onebit.data.read_mat)."""
    blob = bytearray(svhn_mat(3))
    # the X variable's data element tag: after the 128-byte header, the matrix tag (8), flags (16),
    # dims (8 + 16) and the name (8 + 8)
    at = 128 + 8 + 16 + 24 + 16
    assert struct.unpack_from("<I", blob, at)[0] == 2
    blob[at] ^= 0x80
    (tmp_path / "test_32x32.mat").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="unknown type 130") as err:
        load_dataset("svhn", "test", data_dir=tmp_path)
    one_line(err.value)


def test_regression_svhn_declared_sizes_are_checked_before_reading(tmp_path):
    x = bytes(32 * 32 * 3)
    for element, message in [
        (mat_matrix(b"X", 9, (32, 32, 3, 1), 2, x, declared=2**32 - 8), "declares"),
        (mat_matrix(b"X", 9, (32, 32, 3, 2**31 - 1), 2, x), "needs"),
        (mat_matrix(b"X", 9, (32, -32, 3, 1), 2, x), "negative"),
        (mat_element(15, zlib.compress(mat_matrix(b"X", 9, (32, 32, 3, 1), 2, x))[:-9], pad=False), "compressed"),
        (mat_element(15, zlib.compress(struct.pack("<II", 14, 2**32 - 16) + bytes(64)), pad=False), "holds"),
    ]:
        (tmp_path / "test_32x32.mat").write_bytes(mat_file(element))
        with memory_bound(2 << 20), pytest.raises(DataError, match=message):
            load_dataset("svhn", "test", data_dir=tmp_path)


def _object_array_pickle(n: int) -> bytes:
    """`_reconstruct(ndarray, (n,), dtype('O'))`: numpy allocates and fills n object pointers."""
    dtype = b"cnumpy\ndtype\nU\x02O8\x89\x88\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
    return (b"\x80\x02}(C\x04data" + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ"
            + struct.pack("<i", n) + b"\x85" + dtype + b"\x87R" + b"u.")


def test_regression_cifar_declared_array_shape_is_not_allocated():
    """A 150-byte CIFAR pickle made numpy allocate (and fill) 8·10⁸ bytes: `_reconstruct` allocates
    the shape it is given before any data is checked."""
    with memory_bound(1 << 20), pytest.raises(DataError, match="not a valid CIFAR pickle"):
        D._safe_unpickle(_object_array_pickle(10**8), "evil")


def test_regression_cifar_forged_dtype_state():
    """A dtype state with forged flags (claiming object references in a uint64) reached numpy's
    ``dtype.__setstate__`` and left numpy in an internal error ("error return without exception
    set", "get_clear_loop not set"). The stand-in dtype keeps only the byte order of a state."""
    dtype = b"cnumpy\ndtype\nU\x02u8\x89\x88\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
    blob = (b"\x80\x02}(C\x04data" + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01K\x04\x85" + dtype + b"\x89U\x20" + bytes(range(1, 33)) + b"tb" + b"C\x06labels]u.")
    data = D._safe_unpickle(blob, "evil")["data"]
    assert type(data) is np.ndarray and data.dtype == np.uint64 and not data.dtype.hasobject
    np.testing.assert_array_equal(data, np.frombuffer(bytes(range(1, 33)), "<u8"))
    with pytest.raises(DataError, match="N×3072") as err:
        D._cifar_batch(D._safe_unpickle(blob, "evil"), "evil", "labels", 10)
    one_line(err.value)


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x8d"])  # BINBYTES8, BINUNICODE8
def test_regression_cifar_huge_declared_pickle_length(opcode):
    """CPython's unpickler allocates a BINBYTES8/BINUNICODE8 argument from its declared length
    (a 14-byte pickle asked for 32 TiB: MemoryError); a pickletools pre-scan now refuses it."""
    blob = b"\x80\x04" + opcode + struct.pack("<Q", 2**45) + b"abc"
    with memory_bound(1 << 20), pytest.raises(DataError, match="not a valid CIFAR pickle") as err:
        D._safe_unpickle(blob, "evil")
    one_line(err.value)


def test_regression_cifar_tar_member_huge_declared_size(tmp_path):
    """A tar header declaring a 16 TiB member (GNU base-256 size) made `read()` raise a bare
    MemoryError out of the CIFAR loader; members are now size-checked and read in chunks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("test_batch", "batches.meta"):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = 10
            tar.addfile(info, io.BytesIO(b"0123456789"))
    raw = bytearray(buffer.getvalue())
    raw[124:136] = b"\x80" + (2**44).to_bytes(11, "big")
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    root = tmp_path / "c"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(gzip.compress(bytes(raw)))
    with memory_bound(4 << 20), pytest.raises(DataError, match="declares 17592186044416 bytes") as err:
        load_dataset("cifar10", "test", data_dir=root)
    one_line(err.value)


def test_regression_onebit_huge_padding_is_refused(tmp_path):
    """A 700-byte .onebit with a valid checksum — 1×1 conv with a padding of 10⁶ on a 1×1 input, then a
    maxpool as big — loaded fine, and ``predict`` then asked numpy for 4·10¹² bytes per sample."""
    p = 10**6
    meta = {"input_shape": [1, 1, 1], "num_classes": 1, "format": "onebit", "format_version": fmt.FORMAT_VERSION,
            "conventions": dict(fmt.CONVENTIONS), "onebit_version": "x", "layers": [
                {"op": "conv", "name": "c", "params": {"out_channels": 1, "weights": "float", "kernel": [1, 1],
                                                        "stride": [1, 1], "padding": [p, p], "pad_value": 0.0},
                 "tensors": {"weight": "w"}},
                {"op": "maxpool", "name": "p", "params": {"kernel": [2 * p + 1, 2 * p + 1], "stride": [1, 1],
                                                          "padding": [0, 0]}, "tensors": {}},
                {"op": "flatten", "name": "f", "params": {}, "tensors": {}}]}
    fmt._write_raw(tmp_path / "pad.onebit", meta, {"w": np.ones((1, 1, 1, 1), np.float32)})
    with memory_bound(1 << 20), pytest.raises(FormatError, match="limit is 16777216") as err:
        load(tmp_path / "pad.onebit")
    one_line(err.value)
