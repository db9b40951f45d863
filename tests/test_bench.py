"""onebit.bench: the structure of a quick run, its files and its option errors (never its speed)."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from onebit.cli import main as cli_main
import torch

from onebit import bench
from onebit.engine import kernels
from onebit.errors import ConfigError, OnebitError, UnknownNameError

PATHS = [p for p in kernels.available_paths() if p != "numpy"] or ["numpy"]


@pytest.fixture(scope="module")
def quick() -> dict:
    """One quick run of every case on every native path, one thread (the machine may be shared)."""
    return bench.run_benchmark(threads=1, quick=True, reps=1, progress=False)


def test_quick_run_has_every_case_and_path(quick):
    rows = quick["results"]
    assert {r["case"] for r in rows} == {"gemm", "conv", "e2e"}
    for case, modes in (("gemm", {"int32", "threshold"}), ("conv", {"int32", "threshold"}), ("e2e", {"predict"})):
        for path in PATHS:
            assert {r["mode"] for r in rows if r["case"] == case and r["path"] == path} == modes
    assert {r["shape"]["M"] for r in rows if r["case"] == "gemm"} == {m for m, _, _ in bench.QUICK.gemm}
    assert {(r["model"], r["batch"]) for r in rows if r["case"] == "e2e"} == {
        (m, b) for m in ("binarynet_mlp", "binarynet_cnn") for b in bench.QUICK.e2e_batches
    }
    for r in rows:
        assert r["engine_ms"] > 0 and r["torch_ms"] > 0 and r["engine_min_ms"] > 0
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert math.isfinite(r["gops"]) and r["gops"] > 0


def test_quick_run_engine_agrees_with_torch(quick):
    e2e = [r for r in quick["results"] if r["case"] == "e2e"]
    assert e2e
    assert all(r["predictions_equal"] and r["agreement"] == 1.0 for r in e2e)


def test_quick_run_sizes(quick):
    sizes = {s["model"]: s for s in quick["sizes"]}
    assert set(sizes) == {"binarynet_mlp", "binarynet_cnn"}
    mlp = sizes["binarynet_mlp"]
    assert mlp["onebit_bytes"] > 0
    assert mlp["float32_bytes"] > 4 * mlp["params"]  # every parameter as float32, plus BN buffers
    assert mlp["ratio"] == pytest.approx(mlp["float32_bytes"] / mlp["onebit_bytes"])
    assert mlp["ratio"] > 20


def test_quick_run_environment(quick):
    env, settings = quick["environment"], quick["settings"]
    assert env["threads"] == settings["threads"] == 1
    assert env["torch"] == torch.__version__
    assert env["cpu"] and "loadavg_start" in env and "loadavg_end" in env and isinstance(env["busy"], bool)
    assert settings["paths"] == PATHS and settings["quick"] and settings["ops_per_bit_pair"] == 2
    json.dumps(quick, allow_nan=False)  # JSON-serializable, no NaN/inf


def test_quick_run_peak_is_the_best_popcount_of_this_cpu(quick):
    env = quick["environment"]
    native = [p for p in ("avx512", "avx2") if p in PATHS]
    expected = native[0] if native else None
    assert env["peak_loop"] == expected
    assert (env["peak_gops"] is not None and env["peak_gops"] > 0) == (expected is not None)
    # the 512-bit-per-cycle limit describes AVX-512 VPOPCNTQ only
    assert (env["limit_gops"] is not None) == (expected == "avx512")
    rows = [r for r in quick["results"] if r["case"] == "gemm"]
    assert all((r["pct_peak"] is not None) == (expected is not None) for r in rows)


@pytest.mark.skipif(kernels._native is None, reason="native extension not built")
@pytest.mark.parametrize("path", ["avx512", "avx2", "sse9"])
def test_popcount_peak_probe_runs_only_where_the_cpu_has_it(path):
    rate = kernels._native._probe_popcnt_peak(200, path)
    assert (rate > 0) == (path in PATHS)


def test_run_restores_threads_and_path():
    before_threads, before_path = torch.get_num_threads(), kernels.current_path()
    result = bench.run_benchmark(threads=1, quick=True, reps=1, cases="size", progress=False)
    assert result["results"] == [] and len(result["sizes"]) == 2
    assert torch.get_num_threads() == before_threads and kernels.current_path() == before_path


def test_format_table_json_and_plot(quick, tmp_path):
    table = bench.format_table(quick)
    assert "speedup" in table and "binarynet_mlp" in table and "ratio" in table
    out = bench.write_json(quick, tmp_path / "sub" / "bench.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(quick))
    png = bench.plot_speedups(quick, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_command_line(tmp_path, capsys):
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--threads", "1", "--reps", "1", "--cases", "gemm,size",
                              "--paths", PATHS[-1], "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert bench.run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "gemm M=1" in out and "json:" in out and "plot:" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert {r["case"] for r in data["results"]} == {"gemm"} and {r["path"] for r in data["results"]} == {PATHS[-1]}
    assert len(data["sizes"]) == 2
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"cases": "gemm,matmul"}, UnknownNameError, "unknown case 'matmul'"),
        ({"cases": ""}, ConfigError, "at least one case"),
        ({"paths": "avx9000"}, UnknownNameError, "unknown kernel path 'avx9000'"),
        ({"threads": 0}, ConfigError, "threads"),
        ({"threads": -2}, ConfigError, "threads"),
        ({"reps": 0}, ConfigError, "reps"),
        ({"cnn_width": 0.0}, ConfigError, "cnn width"),
        ({"mlp_hidden": 0}, ConfigError, "mlp hidden"),
    ],
)
def test_bad_options(kwargs, error, words):
    with pytest.raises(error) as info:
        bench.run_benchmark(quick=True, progress=False, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_main_reports_bad_option_in_one_line(capsys):
    assert cli_main(["bench", "--quick", "--cases", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onebit: error: unknown case 'nope'") and err.count("\n") == 1


def test_plot_needs_timings(quick, tmp_path):
    with pytest.raises(OnebitError, match="nothing to plot"):
        bench.plot_speedups({**quick, "results": []}, tmp_path / "x.png")


def test_randomize_batchnorm_gives_nontrivial_statistics():
    from onebit.models import create_model

    model = create_model("binarynet_mlp", hidden=64)
    bench.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 4
    hidden = norms[1]
    assert hidden.running_mean.std() > 1 and (hidden.running_var > 0).all()
    assert (hidden.weight < 0).any() or (norms[0].weight < 0).any()
    assert hidden.bias.abs().sum() > 0


def test_median_time_counts_calls():
    calls = []
    t = bench.median_time(lambda: calls.append(1), reps=5, warmup=2)
    assert len(calls) == 7 and 0 <= t.min_ms <= t.median_ms
