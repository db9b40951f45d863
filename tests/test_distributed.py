"""Data-parallel training under torchrun (gloo, 2 CPU processes on 127.0.0.1) and device handling."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onebit.cli import main
from onebit.distributed import GlobalBatchNorm, resolve_device, sync_batch_norm
from onebit.errors import ConfigError
from onebit.train import load_checkpoint

COMMON = ["--dataset", "digits", "--epochs", "1", "--val-fraction", "0", "--threads", "1", "--quiet"]


def onebit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONEBIT_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def failure(result: subprocess.CompletedProcess) -> str:
    """The lines of a failed job that say why (a worker's own error is far above torchrun's summary)."""
    lines = result.stderr.splitlines()
    why = [line for line in lines if any(k in line for k in ("Error", "error:", "what()", "terminate", "Abort"))]
    return "\n".join(why[:20] + ["..."] + lines[-15:])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]


@pytest.mark.parametrize("model, optimizer", [("float_mlp", "sgd"), ("binarynet_mlp", "sgd"), ("binarynet_mlp", "bop")])
def test_two_processes_match_one_process_on_the_doubled_batch(tmp_path, model, optimizer):
    # digits has 1438 training samples: an even count, so both ranks see equal batches. (Adam would
    # turn float-rounding noise in the zero gradients of constant input pixels into lr-sized steps.)
    args = [model, "-m", "hidden=32", "-m", "depth=1", "--optimizer", optimizer, *COMMON]
    single = main(["train", *args, "--batch-size", "100", "--out", str(tmp_path / "one")])
    assert single == 0
    double = onebit("train", *args, "--batch-size", "50", "--nproc", "2", "--sync-bn", "--out", str(tmp_path / "two"))
    assert double.returncode == 0, failure(double)
    assert "test accuracy" in double.stdout and double.stdout.count("test accuracy") == 1  # rank 0 only
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert load_checkpoint(tmp_path / "two" / "last.pt")["world_size"] == 2


def test_resume_with_a_different_number_of_processes(tmp_path):
    out = str(tmp_path / "run")
    args = ["binarynet_mlp", "-m", "hidden=32", "-m", "depth=1", *COMMON[:2], "--val-fraction", "0",
            "--threads", "1", "--quiet", "--batch-size", "50", "--out", out]
    first = onebit("train", *args, "--epochs", "1", "--nproc", "2")
    assert first.returncode == 0, failure(first)
    assert main(["train", *args, "--epochs", "2", "--resume"]) == 0
    state = load_checkpoint(Path(out) / "last.pt")
    assert state["epoch"] == 2 and state["world_size"] == 1
    assert [row["epoch"] for row in state["history"]] == [1, 2]


def test_a_killed_rank_fails_the_job_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONEBIT_DIST_TIMEOUT": "30"}
    job = subprocess.Popen([sys.executable, "-m", "onebit", "train", "binarynet_mlp", "-m", "hidden=256",
                            "--dataset", "digits", "--epochs", "500", "--threads", "1", "--quiet",
                            "--nproc", "2", "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # both ranks are past their first epoch
            assert job.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _descendants(job.pid, "onebit")
        assert len(workers) >= 2, workers
        os.kill(max(workers), signal.SIGKILL)
        code = job.wait(timeout=120)
        assert code != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _descendants(pid: int, needle: str) -> list[int]:
    """Processes below ``pid`` whose command line mentions ``needle`` (torchrun's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline and "torch.distributed.run" not in cmdline:
                found.append(child)
    return found


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(3)
    converted = sync_batch_norm(torch.nn.Sequential(reference), torch.device("cpu"))[0]
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), torch.nn.BatchNorm2d(3)(x))


def test_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="gpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("args, expected", [
    (["--device", "cpu", "--amp"], "amp"),
    (["--nproc", "0"], "positive integer"),
])
def test_bad_distributed_options(tmp_path, args, expected):
    result = onebit("train", "binarynet_mlp", *COMMON, "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert expected in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_a_torchrun_worker_keeps_its_exit_code_and_output():
    # workers leave through os._exit (no interpreter teardown, see onebit/__main__.py): what they
    # printed must still arrive, and the code must still be the command's own
    env = {**os.environ, "WORLD_SIZE": "2"}
    listed = subprocess.run([sys.executable, "-m", "onebit", "models"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "binarynet_mlp" in listed.stdout
    missing = subprocess.run([sys.executable, "-m", "onebit", "eval", "no_such_checkpoint.pt"], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "no_such_checkpoint.pt" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.gpu
def test_cuda_training_step(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    assert main(["train", "binarynet_mlp", "-m", "hidden=64", *COMMON, "--device", "cuda", "--amp",
                 "--out", str(tmp_path / "gpu")]) == 0
