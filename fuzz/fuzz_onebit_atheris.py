#!/usr/bin/env python
"""Coverage-guided fuzzing (atheris = libFuzzer for Python) of the ``.onebit`` reader and the
native engine behind it: every input is written as a model file, loaded, and — if it loads —
run on inputs on and off the 8-bit pixel grid.

    pip install "onebit[fuzz]"
    python fuzz/fuzz_onebit_atheris.py -atheris_runs=20000 build/fuzz-corpus
    fuzz/asan_engine_tests.sh --atheris -atheris_runs=20000 build/fuzz-corpus   # native code under ASan/UBSan

Two kinds of input, chosen by the first byte: raw bytes taken as the whole file (the header
parser, the checksums), and *sealed* mutations — a seed model's metadata and tensors changed
as the input directs (one JSON value replaced, tensor bytes flipped) and written with valid
checksums, as an attacker can, so the graph checks and the kernels behind them are reached.

An input may fail only with an :class:`onebit.errors.OnebitError` (a one-line user error); any
other exception, a crash or a sanitizer report is a finding, which atheris saves as
``crash-<sha1>`` and which becomes a regression test in tests/test_fuzz.py. The Python modules
of the engine are coverage-instrumented; the C++ extension is not (that needs clang's
``-fsanitize=fuzzer``; this project builds with gcc), so for it atheris is a mutation engine
and ASan/UBSan the oracle. The corpus folder is seeded with small exported BinaryNet models
(MLP and CNN, random weights and batch-norm statistics) when it is empty; seeding imports torch.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from onebit.engine import format as onebit_format
    from onebit.engine import load
    from onebit.errors import OnebitError

SEEDS: list[tuple[dict, dict[str, np.ndarray]]] = []  # (metadata, tensors) of the seed models


def seed_corpus(folder: Path) -> None:
    """Write valid model files into an empty ``folder`` (atheris mutates from them)."""
    import torch

    from onebit.bench import randomize_batchnorm
    from onebit.export import export_model
    from onebit.models import create_model

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    generator = torch.Generator().manual_seed(0)
    for name, kwargs, levels in (
        ("binarynet_mlp", {"hidden": 64, "depth": 2, "in_shape": (1, 8, 8)}, 16),
        ("binarynet_cnn", {"width": 0.0625, "fc_units": 32, "in_shape": (1, 12, 12)}, 255),
    ):
        model = create_model(name, **kwargs).eval()
        randomize_batchnorm(model, generator)
        export_model(model, folder / f"{name}.onebit", input_levels=levels)


def _leaves(node, path=()):
    """Paths to every scalar in a JSON-like tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield path


def _replace(node, path, value):
    if len(path) == 1:
        node[path[0]] = value
    else:
        _replace(node[path[0]], path[1:], value)


def sealed_mutation(provider: atheris.FuzzedDataProvider) -> None:
    """Write a seed model with one metadata value and some tensor bytes changed, checksums valid."""
    import copy

    metadata, tensors = SEEDS[provider.ConsumeIntInRange(0, len(SEEDS) - 1)]
    metadata, tensors = copy.deepcopy(metadata), {k: v.copy() for k, v in tensors.items()}
    leaves = [p for p in _leaves(metadata) if p and p[0] not in ("payload_sha256", "header_sha256")]
    path = leaves[provider.ConsumeIntInRange(0, len(leaves) - 1)]
    kind = provider.ConsumeIntInRange(0, 3)
    value = (provider.ConsumeIntInRange(-2**40, 2**40) if kind == 0 else
             provider.ConsumeIntInRange(-3, 70) if kind == 1 else
             provider.ConsumeRegularFloat() if kind == 2 else provider.ConsumeUnicodeNoSurrogates(8))
    _replace(metadata, path, value)
    names = sorted(tensors)
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        raw = tensors[names[provider.ConsumeIntInRange(0, len(names) - 1)]].view(np.uint8).reshape(-1)
        if raw.size:
            raw[provider.ConsumeIntInRange(0, raw.size - 1)] ^= provider.ConsumeIntInRange(1, 255)
    try:
        onebit_format._write_raw(MODEL_FILE, metadata, tensors)
    except OnebitError:
        MODEL_FILE.write_bytes(b"")


MODEL_FILE = Path(tempfile.gettempdir()) / f"onebit-fuzz-{os.getpid()}.onebit"


def run_one(data: bytes) -> None:
    if data[:1] and data[0] % 2 and SEEDS:
        sealed_mutation(atheris.FuzzedDataProvider(data[1:]))
    else:
        MODEL_FILE.write_bytes(data)
    try:
        model = load(MODEL_FILE, threads=1)
    except OnebitError:
        return
    rng = np.random.default_rng(len(data))
    shape = (3, *model.input_shape)
    off_grid = rng.uniform(-1, 1, size=shape).astype(np.float32)
    try:
        model.predict(off_grid)
        if model.input_levels:
            pixels = rng.integers(0, model.input_levels + 1, size=shape, dtype=np.uint8)
            model.predict_uint8(pixels)
    except OnebitError:
        return


def main() -> None:
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if corpus:
        seed_corpus(Path(corpus[0]))
        SEEDS.extend(onebit_format.read_model(path) for path in sorted(Path(corpus[0]).glob("*.onebit")))
    atheris.Setup(sys.argv, run_one)
    try:
        atheris.Fuzz()
    finally:
        MODEL_FILE.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
