"""The ``.onebit`` model file: a safetensors file whose metadata describes the inference graph.

Layout (little-endian throughout, see docs/export.md)::

    u64 N | N bytes of JSON header, padded with spaces to a multiple of 8 | payload

The header is the safetensors header: one entry per tensor ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets into the payload) and ``"__metadata__"``, a map of
strings holding ``"onebit"`` (the model metadata, itself a JSON string) and
``"header_sha256"`` (the SHA-256 of the canonical header without that one entry). The model
metadata holds ``payload_sha256``, the SHA-256 of the payload bytes. Every byte of the file is
thus covered: a flipped bit anywhere is a :class:`~onebit.errors.FormatError`.

The reader trusts nothing: it checks the header length against the file size before reading
the header, refuses numbers JSON cannot hold (``NaN``, ``Infinity``, ``1e400``), checks every
dtype, shape and offset and the payload size (at most :data:`MAX_PAYLOAD_BYTES`) before reading
the payload (which it allocates from the real file size, never from a declared one), both
checksums, the format name and version,
and the graph (:func:`check_graph`: every op's parameters, tensors, shapes and dtypes, which
earlier values each op reads, and the optional ``input_levels``: the model's inputs are
((p / L)·2) − 1 of integer pixels p in 0..L, L an int in 1..255, which lets the engine run the
first layer exactly on pixels).

The graph is a list of ops; op k reads the output of op k − 1 (op 0: the model input) unless
it names another earlier value with ``"input": j`` (j < k; −1 is the model input); ``add``
reads two, ``"inputs": [i, j]``. Every value but the last must be read by some op, so a graph
that uses ``input`` always holds an ``add``, which readers that predate these fields refuse as
an unknown op: the format version stays 1.

This module imports numpy and the standard library only (no torch).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from ..files import atomic_write

__all__ = [
    "CONVENTIONS",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_INPUT_LEVELS",
    "MAX_PAYLOAD_BYTES",
    "MODEL_INPUT",
    "OPS",
    "Value",
    "check_graph",
    "layer_sources",
    "read_model",
    "write_model",
    "words",
]

FORMAT_NAME = "onebit"
FORMAT_VERSION = 1
CONVENTIONS = {"bit_one_means": -1, "word_bits": 64, "bit_order": "lsb_first"}
WORD_BITS = 64

#: safetensors dtype names allowed in a .onebit file → little-endian numpy dtypes
DTYPES: dict[str, np.dtype] = {
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
}
_DTYPE_NAMES = {(dtype.kind, dtype.itemsize): name for name, dtype in DTYPES.items()}


def _dtype_name(dtype: np.dtype) -> str | None:
    return _DTYPE_NAMES.get((dtype.kind, dtype.itemsize))

MAX_HEADER_BYTES = 64 << 20  # a header is a few KiB; refuse to even read a larger one
#: the largest payload read or written: 4 GiB, over 10x the largest real model (a WRN of a few
#: hundred MiB in float32 tensors, binary ones are 32x smaller). The reader allocates the
#: payload from the file size, and a sparse file has a size of terabytes on a few bytes of disk.
MAX_PAYLOAD_BYTES = 4 << 30
MAX_NAME_CHARS = 256
MAX_RANK = 8
MAX_LAYERS = 10_000
#: values one sample may need at any point of the graph (an activation, a padded input, the
#: rows of a float convolution's im2col): 16 Mi, over 9x the largest of an ImageNet ResNet-18.
#: Without it a file of a few hundred bytes (a 1x1 convolution with a padding of 10^6) makes
#: ``predict`` allocate terabytes.
MAX_VALUES_PER_SAMPLE = 1 << 24
#: the largest pixel value of ``input_levels``: pixels are uint8
MAX_INPUT_LEVELS = 255
OPS = ("flatten", "binarize", "dense", "conv", "maxpool", "threshold", "affine", "clamp", "avgpool",
       "pad_channels", "add")
MODEL_INPUT = -1  # the index by which a layer's "input" names the model input
_METADATA_KEYS = {"onebit", "header_sha256"}


def words(bits: int) -> int:
    """64-bit words needed for ``bits`` packed bits."""
    return -(-bits // WORD_BITS)


# --------------------------------------------------------------------------- canonical JSON
def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _padded(header: bytes) -> bytes:
    return header + b" " * (-len(header) % 8)


def _header_digest(header: dict) -> str:
    stripped = dict(header)
    stripped["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != "header_sha256"}
    return hashlib.sha256(_canonical(stripped)).hexdigest()


def _strict_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key[:40]!r} in header")
        out[key] = value
    return out


def _loads(text: str | bytes, what: str) -> Any:
    def reject_constant(name: str):
        raise FormatError(f"{what} holds the non-JSON number {name}")

    def finite_float(literal: str) -> float:
        # 1e400 parses to inf, which _canonical (allow_nan=False) and the graph checks would trip over
        value = float(literal)
        if not math.isfinite(value):
            raise FormatError(f"{what} holds the out-of-range number {literal[:40]}")
        return value

    try:
        return json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=reject_constant,
                          parse_float=finite_float)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON ({str(exc)[:80]})") from None


# --------------------------------------------------------------------------- writing
def _as_tensor(name: Any, array: Any) -> np.ndarray:
    if not isinstance(name, str) or not name or name == "__metadata__" or len(name) > MAX_NAME_CHARS:
        raise FormatError(f"invalid tensor name {name!r}")
    array = np.asarray(array)
    dtype_name = _dtype_name(array.dtype)
    if dtype_name is None:
        raise FormatError(f"tensor {name!r} has dtype {array.dtype}; allowed: uint8, int8, int32, float32, uint64")
    if array.ndim > MAX_RANK:
        raise FormatError(f"tensor {name!r} has {array.ndim} dims; at most {MAX_RANK} are allowed")
    return np.ascontiguousarray(array, dtype=DTYPES[dtype_name])


def _write_raw(path: str | os.PathLike, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write ``metadata`` and ``tensors`` as given (no graph check, checksums filled in).

    For :func:`write_model` and for tests that need a well-formed file with bad content.
    """
    arrays = {name: _as_tensor(name, array) for name, array in tensors.items()}
    # widest dtype first keeps every tensor aligned to its item size within the payload
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        a = arrays[name]
        entries[name] = {
            "dtype": _dtype_name(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    payload = hashlib.sha256()
    for name in order:
        payload.update(arrays[name].tobytes())
    meta = dict(metadata)
    meta["payload_sha256"] = payload.hexdigest()
    header = {**entries, "__metadata__": {"onebit": _canonical(meta).decode("ascii")}}
    header["__metadata__"]["header_sha256"] = _header_digest(header)
    blob = _padded(_canonical(header))
    with atomic_write(path) as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in order:
            handle.write(arrays[name].tobytes())


def write_model(path: str | os.PathLike, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write a ``.onebit`` file (atomically): ``metadata`` describes the graph, ``tensors`` its data.

    ``metadata`` needs ``input_shape``, ``num_classes`` and ``layers`` (and may hold
    ``source_model``, ``input_levels`` and anything else JSON can hold); ``format``, ``format_version``,
    ``conventions`` and ``payload_sha256`` are filled in, ``onebit_version`` unless given.
    The graph is checked first (:func:`check_graph`), so an invalid model is never written.
    """
    from .. import __version__

    if not isinstance(metadata, dict):
        raise FormatError(f"metadata must be a dict, got {type(metadata).__name__}")
    arrays = {name: _as_tensor(name, array) for name, array in tensors.items()}
    total = sum(a.nbytes for a in arrays.values())
    if total > MAX_PAYLOAD_BYTES:  # never write a file read_model refuses
        raise FormatError(f"tensors of {total} bytes exceed the payload limit of {MAX_PAYLOAD_BYTES}")
    meta = dict(metadata)
    meta.pop("payload_sha256", None)
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, conventions=dict(CONVENTIONS))
    meta.setdefault("onebit_version", __version__)
    meta.setdefault("source_model", None)
    try:
        meta = json.loads(_canonical(meta))  # tuples become lists, exactly as a reader sees them
    except (TypeError, ValueError) as exc:
        raise FormatError(f"metadata is not JSON-serializable: {exc}") from None
    check_graph(meta, arrays)
    _write_raw(path, meta, arrays)


# --------------------------------------------------------------------------- reading
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entries(header: dict, payload_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    entries = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not name or len(name) > MAX_NAME_CHARS:
            raise FormatError(f"invalid tensor name {name[:40]!r}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"tensor {name!r}: dtype {str(entry['dtype'])[:20]!r} not allowed (allowed: {', '.join(DTYPES)})")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
            raise FormatError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative ints")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise FormatError(f"tensor {name!r}: data_offsets must be two ints")
        begin, end = offsets
        if not 0 <= begin <= end <= payload_size:
            raise FormatError(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the payload of {payload_size} bytes")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if nbytes != end - begin:
            raise FormatError(f"tensor {name!r}: shape {shape} of {entry['dtype']} needs {nbytes} bytes, offsets span {end - begin}")
        entries[name] = (dtype, tuple(shape), begin, end)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise FormatError(f"tensor {name!r} {what}")
        position = end
    if position != payload_size:
        raise FormatError(f"payload has {payload_size} bytes, tensors cover {position}")
    return entries


def _check_version(meta: dict) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"not a onebit model (format {str(meta.get('format'))[:40]!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise FormatError(
            f"unsupported .onebit format version {str(version)[:20]}; this onebit reads version {FORMAT_VERSION}"
        )
    if meta.get("conventions") != CONVENTIONS:
        raise FormatError(f"unsupported bit conventions {str(meta.get('conventions'))[:120]}; expected {CONVENTIONS}")


def read_model(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and fully validate a ``.onebit`` file: ``(metadata, tensors)``.

    Raises :class:`~onebit.errors.FormatError` for anything but a valid file (and for a
    missing or unreadable one).
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise FormatError(f"cannot open model file {path}: {exc.strerror or exc}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: truncated ({size} bytes, not even a header length)")
        first = handle.read(8)
        if first.startswith(b"PK\x03\x04"):  # a zip archive, as PyTorch writes its checkpoints
            raise FormatError(f"{path}: a zip archive (a PyTorch checkpoint?), not a .onebit file; "
                              "make one with `onebit export CHECKPOINT`")
        (header_size,) = struct.unpack("<Q", first)
        if header_size > size - 8:
            raise FormatError(f"{path}: truncated or corrupt (header of {header_size} bytes in a file of {size})")
        if header_size > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header of {header_size} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        if header_size % 8:
            raise FormatError(f"{path}: header length {header_size} is not a multiple of 8")
        raw = handle.read(header_size)
        if len(raw) != header_size:
            raise FormatError(f"{path}: truncated header")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: header is not ASCII JSON") from None
        header = _loads(text, f"{path}: header")
        if not isinstance(header, dict):
            raise FormatError(f"{path}: header is not a JSON object")
        if _padded(_canonical(header)) != raw:
            raise FormatError(f"{path}: header is not in canonical form (corrupt)")
        extra = header.get("__metadata__")
        if not isinstance(extra, dict) or set(extra) != _METADATA_KEYS or not all(isinstance(v, str) for v in extra.values()):
            raise FormatError(f"{path}: header lacks onebit metadata (not a .onebit file?)")
        if _header_digest(header) != extra["header_sha256"]:
            raise FormatError(f"{path}: header checksum mismatch (corrupt file)")
        payload_size = size - 8 - header_size
        if payload_size > MAX_PAYLOAD_BYTES:  # before allocating it: the size may be a sparse file's
            raise FormatError(f"{path}: payload of {payload_size} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
        entries = _check_entries(header, payload_size)
        meta = _loads(extra["onebit"], f"{path}: metadata")
        if not isinstance(meta, dict):
            raise FormatError(f"{path}: metadata is not a JSON object")
        _check_version(meta)
        # allocated from the real file size (capped above), every declared size checked against it
        try:
            payload = np.empty(payload_size, dtype=np.uint8)
        except MemoryError:
            raise FormatError(f"{path}: not enough memory for a payload of {payload_size} bytes") from None
        if handle.readinto(memoryview(payload)) != payload_size:
            raise FormatError(f"{path}: truncated payload")
    if hashlib.sha256(payload).hexdigest() != meta.get("payload_sha256"):
        raise FormatError(f"{path}: payload checksum mismatch (corrupt file)")
    tensors = {}
    try:
        for name, (dtype, shape, begin, end) in entries.items():
            count = (end - begin) // dtype.itemsize
            # copy: each tensor gets its own aligned, writable buffer in native byte order
            tensors[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=begin).reshape(shape).astype(
                dtype.newbyteorder("="), copy=True
            )
    except MemoryError:
        raise FormatError(f"{path}: not enough memory for the tensors of a payload of {payload_size} bytes") from None
    del payload  # the tensors are copies: free the payload before the graph check
    check_graph(meta, tensors, where=f"{path}: ")
    return meta, tensors


# --------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Value:
    """What flows between ops, per sample, in the engine's layout.

    ``kind``: ``"float"`` (float32), ``"int"`` (int32 binary dot products) or ``"bits"``
    (signs packed along the last axis, ``words(shape[-1])`` uint64 words). ``shape``:
    ``(H, W, C)`` (NHWC) or ``(F,)``. ``scaled``: the value still has to be multiplied by a
    per-sample scale β (XNOR-Net activations), which an ``affine`` with ``sample_scale`` applies.
    """

    kind: str
    shape: tuple[int, ...]
    scaled: bool = False

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 3

    @property
    def channels(self) -> int:
        return self.shape[-1]

    def describe(self) -> str:
        return f"{'scaled ' if self.scaled else ''}{self.kind} {list(self.shape)}"


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Checker:
    def __init__(self, meta: dict, tensors: dict[str, np.ndarray], where: str) -> None:
        self.meta = meta
        self.tensors = tensors
        self.where = where

    def fail(self, index: int | None, message: str) -> FormatError:
        at = "" if index is None else f"layer {index}: "
        return FormatError(f"{self.where}{at}{message}")

    def ints(self, index: int, params: dict, key: str, count: int, minimum: int) -> list[int]:
        value = params.get(key)
        if not (isinstance(value, list) and len(value) == count and all(_is_int(v) and minimum <= v < 2**31 for v in value)):
            raise self.fail(index, f"parameter {key!r} must be {count} ints >= {minimum}, got {str(value)[:40]}")
        return value

    def count(self, index: int, params: dict, key: str) -> int:
        value = params.get(key)
        if not (_is_int(value) and 1 <= value < 2**31):
            raise self.fail(index, f"parameter {key!r} must be a positive int, got {str(value)[:40]}")
        return value

    def choice(self, index: int, params: dict, key: str, allowed: tuple) -> Any:
        value = params.get(key, allowed[0])
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise self.fail(index, f"parameter {key!r} must be one of {list(allowed)}, got {str(value)[:40]}")
        return value

    def tensor(self, index: int, layer: dict, role: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        name = layer.get("tensors", {}).get(role)
        if not isinstance(name, str):
            raise self.fail(index, f"{layer.get('op')} needs a tensor {role!r}")
        array = self.tensors.get(name)
        if array is None:
            raise self.fail(index, f"tensor {name!r} ({role}) is missing from the file")
        if _dtype_name(array.dtype) != dtype:
            raise self.fail(index, f"tensor {name!r} ({role}) has dtype {_dtype_name(array.dtype) or array.dtype}, needs {dtype}")
        if tuple(array.shape) != tuple(shape):
            raise self.fail(index, f"tensor {name!r} ({role}) has shape {list(array.shape)}, needs {list(shape)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise self.fail(index, f"tensor {name!r} ({role}) holds non-finite values")
        return array

    def roles(self, index: int, layer: dict, allowed: set[str]) -> None:
        names = layer.get("tensors", {})
        if not isinstance(names, dict) or set(names) != allowed:
            got = sorted(names) if isinstance(names, dict) else names
            raise self.fail(index, f"{layer.get('op')} takes tensors {sorted(allowed)}, got {got}")

    def bounded(self, index: int | None, what: str, shape: tuple[int, ...]) -> None:
        if math.prod(shape) > MAX_VALUES_PER_SAMPLE:
            raise self.fail(index, f"{what} of shape {list(shape)[:8]} holds {math.prod(shape)} values per sample; "
                                   f"the engine's limit is {MAX_VALUES_PER_SAMPLE}")

    def expect(self, index: int, op: str, value: Value, ok: bool, needs: str) -> None:
        if not ok:
            raise self.fail(index, f"{op} needs {needs}, got {value.describe()}")

    def run(self) -> list[Value]:
        meta = self.meta
        shape = meta.get("input_shape")
        if not (isinstance(shape, list) and len(shape) in (1, 3) and all(_is_int(s) and 1 <= s < 2**31 for s in shape)):
            raise self.fail(None, f"input_shape must be [features] or [C, H, W] of positive ints, got {str(shape)[:60]}")
        classes = meta.get("num_classes")
        if not (_is_int(classes) and classes >= 1):
            raise self.fail(None, f"num_classes must be a positive int, got {str(classes)[:20]}")
        if "input_levels" in meta:  # optional: inputs are ((p / L)·2) − 1 of pixels p in 0..L
            levels = meta["input_levels"]
            if not (_is_int(levels) and 1 <= levels <= MAX_INPUT_LEVELS):
                raise self.fail(None, f"input_levels must be an int in 1..{MAX_INPUT_LEVELS}, got {str(levels)[:20]}")
        layers = meta.get("layers")
        if not (isinstance(layers, list) and 1 <= len(layers) <= MAX_LAYERS):
            raise self.fail(None, "layers must be a non-empty list")
        model_input = Value("float", (shape[1], shape[2], shape[0]) if len(shape) == 3 else (shape[0],))
        self.bounded(None, "the input", model_input.shape)
        values: list[Value] = []
        unread: set[int] = set()
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict) or layer.get("op") not in OPS:
                op = layer.get("op") if isinstance(layer, dict) else layer
                raise self.fail(index, f"unknown op {str(op)[:40]!r} (known: {', '.join(OPS)})")
            params = layer.get("params", {})
            if not isinstance(params, dict):
                raise self.fail(index, "params must be an object")
            sources = self.sources(index, layer)
            unread.difference_update(sources)
            inputs = [model_input if source == MODEL_INPUT else values[source] for source in sources]
            value = getattr(self, "op_" + layer["op"])(index, layer, params, *inputs)
            self.bounded(index, f"{layer['op']} output", value.shape)
            values.append(value)
            unread.add(index)
        unread.discard(len(layers) - 1)  # (layer 0 always reads the model input)
        if unread:  # dead ops; and so a graph that uses "input" holds an "add" (the module docstring)
            raise self.fail(min(unread), "no later layer reads this layer's output (only the last one may be unread)")
        if values[-1] != Value("float", (classes,)):
            raise self.fail(None, f"the graph ends in {values[-1].describe()}, not float logits [{classes}]")
        return values

    def sources(self, index: int, layer: dict) -> tuple[int, ...]:
        """Check the ``input`` / ``inputs`` fields of a layer; the values it reads (:func:`layer_sources`)."""
        op = layer["op"]
        earlier = "-1 (the model input)" + (f" or 0..{index - 1}" if index else "")

        def is_earlier(source: Any) -> bool:
            return _is_int(source) and MODEL_INPUT <= source < index

        if op == "add":
            if "input" in layer:
                raise self.fail(index, "add reads two values, 'inputs', not 'input'")
            sources = layer.get("inputs")
            if not (isinstance(sources, list) and len(sources) == 2 and all(map(is_earlier, sources))):
                raise self.fail(index, f"add needs 'inputs': two indices of earlier values, each {earlier}; "
                                       f"got {sources!r:.40}")
        elif "inputs" in layer:
            raise self.fail(index, f"{op} reads one value, 'input', not 'inputs'")
        elif "input" in layer and not is_earlier(layer["input"]):
            raise self.fail(index, f"'input' must be the index of an earlier value, {earlier}; "
                                   f"got {layer['input']!r:.40}")
        return layer_sources(layer, index)

    # each op_*: (index, layer, params, *input values) -> output value
    def op_flatten(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        return Value(value.kind, (math.prod(value.shape),), value.scaled)

    def op_binarize(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        self.expect(index, "binarize", value, value.kind == "float" and not value.scaled, "a float input")
        scale = self.choice(index, params, "scale", ("none", "mean_abs"))
        return Value("bits", value.shape, scale == "mean_abs")

    def _weights(self, index, layer, params, value: Value, op: str) -> str:
        weights = self.choice(index, params, "weights", ("binary", "float"))
        if weights == "float":
            self.expect(index, op, value, value.kind == "float" and not value.scaled, "a float input for float weights")
        else:
            self.expect(index, op, value, value.kind in ("float", "bits") and not (value.kind == "float" and value.scaled),
                        "a float or bits input")
        return weights

    def op_dense(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, {"weight"})
        self.expect(index, "dense", value, not value.spatial, "a flat input (flatten first)")
        weights = self._weights(index, layer, params, value, "dense")
        out = self.count(index, params, "out_features")
        features = value.shape[0]
        if weights == "float":
            self.tensor(index, layer, "weight", "F32", (out, features))
        else:
            self.tensor(index, layer, "weight", "U64", (out, words(features)))
        return Value("int" if value.kind == "bits" else "float", (out,), value.scaled)

    def op_conv(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, {"weight"})
        self.expect(index, "conv", value, value.spatial, "an NHWC input")
        weights = self._weights(index, layer, params, value, "conv")
        out = self.count(index, params, "out_channels")
        kh, kw = self.ints(index, params, "kernel", 2, 1)
        sh, sw = self.ints(index, params, "stride", 2, 1)
        ph, pw = self.ints(index, params, "padding", 2, 0)
        pad_value = params.get("pad_value")
        if value.kind == "bits":
            if pad_value not in (0, 1, -1) or isinstance(pad_value, bool):
                raise self.fail(index, f"conv on bits needs pad_value 0, 1 or -1, got {str(pad_value)[:20]}")
        elif not _finite_number(pad_value):
            raise self.fail(index, f"conv pad_value must be a finite number, got {str(pad_value)[:20]}")
        h, w, c = value.shape
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise self.fail(index, f"conv kernel {kh}x{kw} larger than the padded input {h + 2 * ph}x{w + 2 * pw}")
        self.bounded(index, "padded conv input", (h + 2 * ph, w + 2 * pw, c))
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        self.bounded(index, "conv im2col", (ho, wo, kh, kw, c))
        if weights == "float":
            self.tensor(index, layer, "weight", "F32", (out, kh, kw, c))
        else:
            self.tensor(index, layer, "weight", "U64", (out, kh, kw, words(c)))
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return Value("int" if value.kind == "bits" else "float", (ho, wo, out), value.scaled)

    def window(self, index, op: str, params: dict, value: Value) -> tuple[int, int, int]:
        """Check a pooling window (``kernel``, ``stride``, ``padding`` of at most half the kernel,
        so that every window holds an input cell); the output shape."""
        kh, kw = self.ints(index, params, "kernel", 2, 1)
        sh, sw = self.ints(index, params, "stride", 2, 1)
        ph, pw = self.ints(index, params, "padding", 2, 0)
        if 2 * ph > kh or 2 * pw > kw:
            raise self.fail(index, f"{op} padding must be at most half the kernel")
        h, w, c = value.shape
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise self.fail(index, f"{op} kernel {kh}x{kw} larger than the padded input")
        self.bounded(index, f"padded {op} input", (h + 2 * ph, w + 2 * pw, c))
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, c

    def op_maxpool(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        self.expect(index, "maxpool", value, value.spatial, "an NHWC input")
        return Value(value.kind, self.window(index, "maxpool", params, value), value.scaled)

    def op_avgpool(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        self.expect(index, "avgpool", value, value.spatial and value.kind == "float" and not value.scaled,
                    "a float NHWC input")
        return Value("float", self.window(index, "avgpool", params, value))

    def op_pad_channels(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        self.expect(index, "pad_channels", value, value.spatial and value.kind == "float" and not value.scaled,
                    "a float NHWC input")
        h, w, c = value.shape
        return Value("float", (h, w, c + self.count(index, params, "extra")))

    def op_add(self, index, layer, params, first: Value, second: Value) -> Value:
        self.roles(index, layer, set())
        if first != second or first.kind != "float" or first.scaled:
            raise self.fail(index, f"add needs two float values of the same shape, got {first.describe()} "
                                   f"and {second.describe()}")
        return first

    def op_threshold(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, {"threshold", "direction"})
        self.expect(index, "threshold", value, value.kind in ("int", "float") and not value.scaled, "an int or float input")
        c = value.channels
        self.tensor(index, layer, "threshold", "I32" if value.kind == "int" else "F32", (c,))
        direction = self.tensor(index, layer, "direction", "I8", (c,))
        if not np.isin(direction, (-1, 0, 1)).all():
            raise self.fail(index, "threshold directions must be -1, 0 or 1")
        return Value("bits", value.shape)

    def op_affine(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, {"mul", "add"})
        sample_scale = self.choice(index, params, "sample_scale", (False, True))
        self.expect(index, "affine", value, value.kind in ("int", "float") and value.scaled == sample_scale,
                    f"an int or float input{' with a per-sample scale' if sample_scale else ''}")
        c = value.channels
        self.tensor(index, layer, "mul", "F32", (c,))
        self.tensor(index, layer, "add", "F32", (c,))
        return Value("float", value.shape)

    def op_clamp(self, index, layer, params, value: Value) -> Value:
        self.roles(index, layer, set())
        self.expect(index, "clamp", value, value.kind == "float" and not value.scaled, "a float input")
        low, high = params.get("min"), params.get("max")
        if not all(v is None or _finite_number(v) for v in (low, high)) or (low is not None and high is not None and low > high):
            raise self.fail(index, f"clamp needs finite min <= max (or null), got {str(low)[:20]}, {str(high)[:20]}")
        return value


def layer_sources(layer: dict, index: int) -> tuple[int, ...]:
    """The values layer ``index`` of a checked graph reads: indices of earlier layers, or
    ``MODEL_INPUT`` (−1) for the model input; the previous layer's output unless ``input`` or
    (``add``) ``inputs`` says otherwise."""
    if layer["op"] == "add":
        return tuple(layer["inputs"])
    return (layer.get("input", index - 1),)


def check_graph(metadata: dict, tensors: dict[str, np.ndarray], where: str = "") -> list[Value]:
    """Check the graph of ``metadata`` against ``tensors``; return each layer's output :class:`Value`.

    Raises :class:`~onebit.errors.FormatError` naming the layer and what is wrong.
    """
    _check_version(metadata)
    return _Checker(metadata, tensors, where).run()
