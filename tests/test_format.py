"""The .onebit file: round trip, and a reader that refuses every damaged or hostile file with a FormatError."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onebit.engine import format as fmt
from onebit.engine.format import FORMAT_VERSION, check_graph, read_model, write_model
from onebit.errors import FormatError


def tiny() -> tuple[dict, dict[str, np.ndarray]]:
    """A hand-made graph: [2, 3, 3] image → flatten → dense (real × binary) → threshold → dense → affine."""
    rng = np.random.default_rng(0)
    metadata = {
        "source_model": {"name": "hand-made", "kwargs": {"hidden": 5}},
        "input_shape": [2, 3, 3],
        "num_classes": 3,
        "layers": [
            {"op": "flatten", "name": "flatten"},
            {"op": "dense", "name": "fc1", "params": {"out_features": 5, "weights": "binary"}, "tensors": {"weight": "fc1.w"}},
            {"op": "threshold", "name": "bn1", "tensors": {"threshold": "bn1.t", "direction": "bn1.s"}},
            {"op": "dense", "name": "out", "params": {"out_features": 3, "weights": "binary"}, "tensors": {"weight": "out.w"}},
            {"op": "affine", "name": "bn2", "params": {"sample_scale": False}, "tensors": {"mul": "bn2.mul", "add": "bn2.add"}},
        ],
    }
    tensors = {
        "fc1.w": rng.integers(0, 2**18, size=(5, 1), dtype=np.uint64),
        "bn1.t": rng.normal(size=5).astype(np.float32),
        "bn1.s": np.array([1, -1, 0, 1, -1], dtype=np.int8),
        "out.w": rng.integers(0, 2**5, size=(3, 1), dtype=np.uint64),
        "bn2.mul": rng.normal(size=3).astype(np.float32),
        "bn2.add": rng.normal(size=3).astype(np.float32),
    }
    return metadata, tensors


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onebit"
    write_model(path, *tiny())
    return path


def craft(path: Path, entries: dict, meta: dict, payload: bytes, *, header_digest: bool = True) -> Path:
    """A file with exactly this header and payload; checksums made consistent (as an attacker would)."""
    meta = dict(meta, payload_sha256=hashlib.sha256(payload).hexdigest())
    header = {**entries, "__metadata__": {"onebit": fmt._canonical(meta).decode()}}
    header["__metadata__"]["header_sha256"] = fmt._header_digest(header) if header_digest else "0" * 64
    blob = fmt._padded(fmt._canonical(header))
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)
    return path


def good_meta() -> dict:
    meta, _ = tiny()
    return dict(meta, format="onebit", format_version=FORMAT_VERSION, conventions=dict(fmt.CONVENTIONS), onebit_version="0")


# --------------------------------------------------------------------------- round trip
def test_round_trip(model_file: Path):
    metadata, tensors = tiny()
    meta, read = read_model(model_file)
    assert meta["format"] == "onebit" and meta["format_version"] == FORMAT_VERSION
    assert meta["conventions"] == {"bit_one_means": -1, "word_bits": 64, "bit_order": "lsb_first"}
    assert meta["layers"] == json.loads(json.dumps(metadata["layers"]))
    assert meta["source_model"] == metadata["source_model"]
    assert meta["input_shape"] == [2, 3, 3] and meta["num_classes"] == 3
    assert len(meta["payload_sha256"]) == 64 and "onebit_version" in meta
    assert set(read) == set(tensors)
    for name, array in tensors.items():
        assert read[name].dtype == array.dtype and read[name].flags.writeable and read[name].flags.aligned
        np.testing.assert_array_equal(read[name], array)


def test_file_is_plain_safetensors(model_file: Path):
    """Any safetensors reader sees the tensors and the metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    _, tensors = tiny()
    loaded = load_file(str(model_file))
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
    with safe_open(str(model_file), framework="np") as handle:
        meta = json.loads(handle.metadata()["onebit"])
    assert meta["format"] == "onebit"


def test_writer_is_deterministic(tmp_path: Path):
    write_model(tmp_path / "a.onebit", *tiny())
    write_model(tmp_path / "b.onebit", *tiny())
    assert (tmp_path / "a.onebit").read_bytes() == (tmp_path / "b.onebit").read_bytes()


def test_writer_checks_the_graph_and_leaves_no_file(tmp_path: Path):
    metadata, tensors = tiny()
    tensors["fc1.w"] = tensors["fc1.w"][:4]
    with pytest.raises(FormatError, match=r"layer 1: tensor 'fc1.w' \(weight\) has shape \[4, 1\], needs \[5, 1\]"):
        write_model(tmp_path / "bad.onebit", metadata, tensors)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float16, np.bool_])
def test_writer_refuses_other_dtypes(tmp_path: Path, dtype):
    metadata, tensors = tiny()
    tensors["extra"] = np.zeros(3, dtype=dtype)
    with pytest.raises(FormatError, match="dtype"):
        write_model(tmp_path / "x.onebit", metadata, tensors)


def test_missing_file():
    with pytest.raises(FormatError, match="cannot open"):
        read_model("/nonexistent/model.onebit")


# --------------------------------------------------------------------------- damage
def test_truncation_at_every_offset(model_file: Path):
    size = model_file.stat().st_size
    for cut in range(size - 1, -1, -1):  # shorten in place, one byte at a time
        os.truncate(model_file, cut)
        with pytest.raises(FormatError):
            read_model(model_file)


def test_appended_bytes(model_file: Path, tmp_path: Path):
    longer = tmp_path / "long.onebit"
    longer.write_bytes(model_file.read_bytes() + b"\0" * 8)
    with pytest.raises(FormatError):
        read_model(longer)


def test_every_single_bit_flip_is_detected(model_file: Path):
    data = model_file.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    messages = set()
    with open(model_file, "r+b") as handle:  # flip in place: one byte written per flip
        for position in range(len(data)):
            for bit in range(8):
                handle.seek(position)
                handle.write(bytes([data[position] ^ (1 << bit)]))
                handle.flush()
                with pytest.raises(FormatError) as info:
                    read_model(model_file)
                if position >= 8 + header_size:
                    messages.add(str(info.value).split(": ", 1)[1])
            handle.seek(position)
            handle.write(data[position:position + 1])
    assert messages == {"payload checksum mismatch (corrupt file)"}
    read_model(model_file)  # restored


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_corruption_is_a_format_error(model_file: Path, edits):
    data = bytearray(model_file.read_bytes())
    for position, byte in edits:
        data[position % len(data)] = byte
    if bytes(data) == model_file.read_bytes():
        return
    damaged = model_file.with_name("damaged.onebit")
    damaged.write_bytes(data)
    with pytest.raises(FormatError):
        read_model(damaged)


# --------------------------------------------------------------------------- hostile or foreign headers
def test_other_format_version(tmp_path: Path):
    metadata, tensors = tiny()
    path = tmp_path / "v2.onebit"
    fmt._write_raw(path, dict(good_meta(), format_version=2), tensors)
    with pytest.raises(FormatError, match=r"format version 2; this onebit reads version 1"):
        read_model(path)


def test_not_a_onebit_file(tmp_path: Path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(FormatError):
        read_model(path)
    path.write_bytes(b"PK\x03\x04 definitely a zip file, not a model")
    with pytest.raises(FormatError):
        read_model(path)


def test_other_conventions(tmp_path: Path):
    _, tensors = tiny()
    meta = good_meta()
    meta["conventions"] = dict(meta["conventions"], bit_one_means=1)
    fmt._write_raw(tmp_path / "c.onebit", meta, tensors)
    with pytest.raises(FormatError, match="conventions"):
        read_model(tmp_path / "c.onebit")


def test_huge_header_length_does_not_allocate(tmp_path: Path):
    path = tmp_path / "huge.onebit"
    for declared in (2**63, 2**40, 10**9):
        path.write_bytes(struct.pack("<Q", declared) + b"{}" + b" " * 30)
        tracemalloc.start()
        try:
            with pytest.raises(FormatError, match="header"):
                read_model(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def raw_header(path: Path, text: str, payload: bytes = b"") -> Path:
    """A file whose header is exactly ``text`` (padded), no checksums."""
    blob = fmt._padded(text.encode())
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)
    return path


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1e400}',
        '{"__metadata__":{"header_sha256":"x","onebit":"{}"},'
        '"a":{"data_offsets":[0,0],"dtype":"U8","shape":[1e400]}}',
        '{"a":-1E+999}',
    ],
)
def test_out_of_range_numbers_in_the_header(tmp_path: Path, text):
    """json reads 1e400 as inf, which the canonical check (allow_nan=False) would raise a ValueError on."""
    with pytest.raises(FormatError, match=r"header holds the out-of-range number -?1[eE]"):
        read_model(raw_header(tmp_path / "inf.onebit", text))
    with pytest.raises(FormatError, match="header holds the non-JSON number Infinity"):
        read_model(raw_header(tmp_path / "inf.onebit", '{"a":Infinity}'))


def test_out_of_range_number_in_the_metadata(tmp_path: Path):
    """The metadata string, under a consistent header checksum, is parsed as strictly."""
    header = {"__metadata__": {"onebit": '{"format":"onebit","x":1e400}'}}
    header["__metadata__"]["header_sha256"] = fmt._header_digest(header)
    with pytest.raises(FormatError, match="metadata holds the out-of-range number 1e400"):
        read_model(raw_header(tmp_path / "inf.onebit", fmt._canonical(header).decode()))


def test_sparse_payload_is_refused_without_allocating(tmp_path: Path):
    """A valid header declaring 1 TiB, the file extended to match without writing a byte (sparse)."""
    size = 1 << 40
    assert size > fmt.MAX_PAYLOAD_BYTES
    entries = {"t": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    path = craft(tmp_path / "sparse.onebit", entries, good_meta(), b"")
    try:
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size + size)
    except OSError as exc:  # pragma: no cover - a file system without files this large
        pytest.skip(f"cannot make a sparse file of {size} bytes: {exc}")
    try:
        tracemalloc.start()
        try:
            with pytest.raises(FormatError, match=rf"payload of {size} bytes exceeds the limit of {fmt.MAX_PAYLOAD_BYTES}"):
                read_model(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
    finally:
        path.unlink()


def test_payload_limit_binds_writer_and_reader(model_file: Path, tmp_path: Path, monkeypatch):
    """The writer never writes a file the reader refuses; and a payload that fits the limit but not in
    memory is a FormatError, not a MemoryError."""
    payload = model_file.stat().st_size - 8 - struct.unpack("<Q", model_file.read_bytes()[:8])[0]
    monkeypatch.setattr(fmt, "MAX_PAYLOAD_BYTES", payload - 1)
    with pytest.raises(FormatError, match=f"payload of {payload} bytes exceeds the limit of {payload - 1}"):
        read_model(model_file)
    with pytest.raises(FormatError, match=f"tensors of {payload} bytes exceed the payload limit of {payload - 1}"):
        write_model(tmp_path / "big.onebit", *tiny())
    assert not (tmp_path / "big.onebit").exists()
    monkeypatch.setattr(fmt, "MAX_PAYLOAD_BYTES", payload)
    write_model(tmp_path / "fits.onebit", *tiny())
    read_model(tmp_path / "fits.onebit")

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(fmt.np, "empty", no_memory)
    with pytest.raises(FormatError, match=f"not enough memory for a payload of {payload} bytes"):
        read_model(model_file)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "U64", "shape": [2**59], "data_offsets": [0, 2**62]}, "outside the payload"),
        ({"dtype": "U64", "shape": [2**40, 2**40], "data_offsets": [0, 40]}, "needs"),
        ({"dtype": "U64", "shape": [-5], "data_offsets": [0, 40]}, "non-negative"),
        ({"dtype": "F64", "shape": [5], "data_offsets": [0, 40]}, "not allowed"),
        ({"dtype": "U64", "shape": [5], "data_offsets": [8, 48]}, "outside the payload"),
        ({"dtype": "U64", "shape": [5], "data_offsets": [40, 0]}, "outside the payload"),
        ({"dtype": "U64", "shape": [5], "data_offsets": [0]}, "two ints"),
        ({"dtype": "U64", "shape": 5, "data_offsets": [0, 40]}, "shape"),
        ({"dtype": "U64", "shape": [5], "data_offsets": [0, 40], "extra": 1}, "exactly"),
    ],
)
def test_hostile_tensor_entries(tmp_path: Path, entry, message):
    tracemalloc.start()
    try:
        path = craft(tmp_path / "h.onebit", {"w": entry}, good_meta(), bytes(40))
        with pytest.raises(FormatError, match=message):
            read_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_overlapping_and_gapped_tensors(tmp_path: Path):
    a = {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}
    overlap = {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}
    with pytest.raises(FormatError, match="overlaps"):
        read_model(craft(tmp_path / "o.onebit", {"a": a, "b": overlap}, good_meta(), bytes(16)))
    gap = {"dtype": "U8", "shape": [4], "data_offsets": [12, 16]}
    with pytest.raises(FormatError, match="gap"):
        read_model(craft(tmp_path / "g.onebit", {"a": a, "b": gap}, good_meta(), bytes(16)))


def test_header_checksum(tmp_path: Path):
    _, tensors = tiny()
    entries, offset, payload = {}, 0, b""
    for name in sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n)):
        raw = tensors[name].tobytes()
        entries[name] = {"dtype": fmt._dtype_name(tensors[name].dtype), "shape": list(tensors[name].shape),
                         "data_offsets": [offset, offset + len(raw)]}
        offset, payload = offset + len(raw), payload + raw
    read_model(craft(tmp_path / "ok.onebit", entries, good_meta(), payload))  # consistent: fine
    with pytest.raises(FormatError, match="header checksum mismatch"):
        read_model(craft(tmp_path / "bad.onebit", entries, good_meta(), payload, header_digest=False))


def test_non_canonical_header(model_file: Path, tmp_path: Path):
    data = model_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    blob = fmt._padded(json.dumps(header, indent=1).encode())  # same content, other bytes
    path = tmp_path / "pretty.onebit"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    with pytest.raises(FormatError, match="canonical"):
        read_model(path)


# --------------------------------------------------------------------------- the graph
def graph_error(mutate) -> str:
    metadata, tensors = tiny()
    meta = dict(good_meta())
    mutate(meta, tensors)
    with pytest.raises(FormatError) as info:
        check_graph(meta, tensors)
    return str(info.value)


def test_graph_errors_name_the_problem():
    def set_layer(i, **changes):
        def mutate(meta, tensors):
            meta["layers"] = [dict(layer) for layer in meta["layers"]]
            meta["layers"][i].update(changes)
        return mutate

    assert "unknown op 'softmax'" in graph_error(set_layer(2, op="softmax"))
    assert "missing from the file" in graph_error(lambda m, t: t.pop("out.w"))
    assert "has dtype I32, needs U64" in graph_error(lambda m, t: t.update({"fc1.w": t["fc1.w"].astype(np.int32)}))
    assert "has dtype F32, needs I32" not in graph_error(lambda m, t: t.update({"bn1.t": t["bn1.t"][:4]}))
    assert "needs [5]" in graph_error(lambda m, t: t.update({"bn1.t": t["bn1.t"][:4]}))
    assert "directions must be -1, 0 or 1" in graph_error(lambda m, t: t.update({"bn1.s": np.full(5, 3, np.int8)}))
    assert "non-finite" in graph_error(lambda m, t: t.update({"bn2.mul": np.full(3, np.nan, np.float32)}))
    assert "flat input" in graph_error(set_layer(0, op="maxpool", params={"kernel": [1, 1], "stride": [1, 1], "padding": [0, 0]}))
    assert "not float logits [4]" in graph_error(lambda m, t: m.update(num_classes=4))
    assert "input_shape" in graph_error(lambda m, t: m.update(input_shape=[2, 3]))
    assert "out_features" in graph_error(set_layer(1, params={"out_features": 0, "weights": "binary"}))
    assert "takes tensors" in graph_error(set_layer(0, tensors={"weight": "fc1.w"}))
    assert "version" in graph_error(lambda m, t: m.update(format_version="1"))


@pytest.mark.parametrize("levels", [0, 256, -1, 16.0, 255.5, "255", True, None, [255]])
def test_bad_input_levels(levels, tmp_path: Path):
    """input_levels, the optional pixel grid of the inputs, must be an int in 1..255."""
    assert "input_levels must be an int in 1..255" in graph_error(lambda m, t: m.update(input_levels=levels))
    with pytest.raises(FormatError, match="input_levels"):
        write_model(tmp_path / "bad.onebit", dict(tiny()[0], input_levels=levels), tiny()[1])
    assert not (tmp_path / "bad.onebit").exists()
    meta, tensors = tiny()
    fmt._write_raw(tmp_path / "raw.onebit", dict(good_meta(), input_levels=levels), tensors)
    with pytest.raises(FormatError, match="input_levels"):
        read_model(tmp_path / "raw.onebit")


@pytest.mark.parametrize("levels", [1, 16, 255])
def test_input_levels_round_trip(levels, tmp_path: Path):
    write_model(tmp_path / "m.onebit", dict(tiny()[0], input_levels=levels), tiny()[1])
    assert read_model(tmp_path / "m.onebit")[0]["input_levels"] == levels
    write_model(tmp_path / "plain.onebit", *tiny())
    assert "input_levels" not in read_model(tmp_path / "plain.onebit")[0]  # optional: absent unless given
