"""The engine under load: many threads calling one model, and many thousands of small calls.

A loaded :class:`onebit.engine.Model` holds no mutable state, so concurrent ``predict`` calls
(each of which may itself run OpenMP threads in the native kernels) must give exactly the serial
results; and a long stream of small calls must not grow the process's memory.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from onebit.engine import kernels, load
from onebit.export import export_model
from onebit.models import create_model

PAGE = os.sysconf("SC_PAGE_SIZE")
#: under fuzz/asan_engine_tests.sh freed memory sits in ASan's quarantine: RSS says nothing about leaks
SANITIZED = bool(os.environ.get("ONEBIT_EXPECT_SANITIZED"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics, so thresholds and directions vary per channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 3)
                m.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


MODELS = {
    "mlp": ("binarynet_mlp", dict(in_shape=(1, 12, 12), num_classes=10, hidden=96, depth=2)),
    "cnn": ("binarynet_cnn", dict(in_shape=(3, 16, 16), num_classes=10, channels=(16, 32, 64), fc_units=32)),
    "tiny": ("binarynet_mlp", dict(in_shape=(1, 8, 8), num_classes=10, hidden=16, depth=1)),
}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    files = {}
    for key, (name, kwargs) in MODELS.items():
        torch.manual_seed(len(key))
        path = tmp_path_factory.mktemp("models") / f"{key}.onebit"
        export_model(randomized(create_model(name, **kwargs), len(key)), path, source={"name": name})
        files[key] = (path, kwargs["in_shape"])
    return files


def batches(shape, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (int(rng.integers(1, 9)), *shape)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("threads", [None, 1, 2])
@pytest.mark.parametrize("key", ["mlp", "cnn"])
def test_concurrent_predict_equals_serial(model_files, key, threads):
    path, shape = model_files[key]
    model = load(path, threads=threads)
    inputs = batches(shape, 64, seed=len(key))
    serial = [model.predict(x) for x in inputs]
    start = threading.Barrier(8)

    def worker(offset: int) -> list[np.ndarray]:
        start.wait()  # all threads hit the model at the same moment
        order = list(range(offset, len(inputs))) + list(range(offset))
        return [(i, model.predict(inputs[i])) for i in order]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for results in pool.map(worker, range(0, 64, 8)):
            for i, got in results:
                np.testing.assert_array_equal(got, serial[i])


@pytest.mark.parametrize("key", ["mlp", "cnn"])
def test_concurrent_loads_and_every_kernel_path(model_files, key, restore_kernel_path):
    """Threads loading the same file while others predict; then each kernel path gives the same bits."""
    path, shape = model_files[key]
    x = batches(shape, 1, seed=3)[0]
    expected = load(path).predict(x)

    def load_and_predict(_):
        return load(path, threads=1).predict(x)

    with ThreadPoolExecutor(max_workers=6) as pool:
        for got in pool.map(load_and_predict, range(12)):
            np.testing.assert_array_equal(got, expected)
    for kernel_path in kernels.available_paths():
        kernels.set_path(kernel_path)
        np.testing.assert_array_equal(load(path).predict(x), expected, err_msg=kernel_path)


def _calls_do_not_grow_memory(model_files, calls: int, key: str = "tiny", limit_mb: float = 8.0) -> float:
    path, shape = model_files[key]
    model = load(path, threads=1)
    x = np.random.default_rng(0).uniform(-1, 1, (1, *shape)).astype(np.float32)
    expected = model.predict(x)
    for _ in range(300):  # warm up: allocator pools, caches, lazy imports
        model.predict(x)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for i in range(calls):
        out = model.predict(x)
        if i % 1000 == 0:
            np.testing.assert_array_equal(out, expected)
    seconds = time.perf_counter() - started
    gc.collect()
    grown = (rss_bytes() - before) / 2**20
    if not SANITIZED:
        assert grown < limit_mb, f"RSS grew by {grown:.1f} MiB over {calls} predict calls"
    return seconds


def test_ten_thousand_small_calls_are_fast_and_do_not_grow_memory(model_files):
    """10,000 single-sample calls of a tiny MLP: under 10 s (about 0.6 s here), RSS growth < 8 MiB
    (a leak of 1 KiB per call would show as 10 MiB)."""
    seconds = _calls_do_not_grow_memory(model_files, 10_000)
    assert seconds < (60 if SANITIZED else 10), f"10,000 single-sample predictions took {seconds:.1f} s"


@pytest.mark.slow
def test_ten_thousand_small_cnn_calls_do_not_grow_memory(model_files):
    seconds = _calls_do_not_grow_memory(model_files, 10_000, "cnn")
    assert seconds < 120


def test_ten_thousand_calls_from_four_threads_do_not_grow_memory(model_files):
    path, shape = model_files["tiny"]
    model = load(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, *shape)).astype(np.float32)
    expected = model.predict(x)

    def work(n):
        for i in range(n):
            out = model.predict(x)
            if i % 500 == 0:
                np.testing.assert_array_equal(out, expected)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, [250] * 4))  # warm up
    gc.collect()
    before = rss_bytes()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, [2_500] * 4))
    gc.collect()
    grown = (rss_bytes() - before) / 2**20
    if not SANITIZED:
        assert grown < 8.0, f"RSS grew by {grown:.1f} MiB over 10,000 concurrent calls"
