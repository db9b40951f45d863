"""Crash-safe training runs: kill -9 at random points, a full disk, and what is left on disk.

A run of ``python -m onebit train binarynet_mlp --dataset digits -m hidden=64`` is killed with
SIGKILL at seeded random moments (before, during and between epochs, inside checkpoint writes).
After every kill, each file the run writes atomically (``last.pt``, ``best.pt``, ``config.json``,
``result.json``) is either absent or complete — never a partial file in place of a good one; a
temporary file may remain only under its ``.<name>.*.tmp`` name. ``--resume`` then finishes the
run, and its final weights are bit-identical to those of a run that was never interrupted.

A full disk (``ENOSPC`` from the file's writes, its fsync or the rename) leaves the previous
checkpoint byte-identical, removes the temporary file, and the CLI prints one line and exits 2.
"""
from __future__ import annotations

import errno
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import onebit
from onebit import cli
from onebit import files as onebit_files
from onebit.errors import FileWriteError
from onebit.files import atomic_write
from onebit.errors import OnebitError
from onebit.train import load_checkpoint
from trainconfigs import rewind_to_epoch

SRC = str(Path(onebit.__file__).resolve().parents[1])
EPOCHS = 40
ATOMIC = ("last.pt", "best.pt", "config.json", "result.json")
TEMP = re.compile(r"^\.(last\.pt|best\.pt|config\.json|result\.json)\..+\.tmp$")


def train_args(out: Path, epochs: int = EPOCHS, *extra: str) -> list[str]:
    return ["train", "binarynet_mlp", "--dataset", "digits", "-m", "hidden=64", "--epochs", str(epochs),
            "--out", str(out), "--quiet", "--threads", "1", *extra]


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def start(out: Path, epochs: int = EPOCHS) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "onebit", *train_args(out, epochs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def check_left_behind(out: Path) -> int | None:
    """Every atomically written file is complete; only temporaries under their own names. Returns last.pt's epoch."""
    if not out.exists():
        return None
    for entry in out.iterdir():
        if entry.name.endswith(".tmp"):
            assert TEMP.match(entry.name), f"unexpected temporary file {entry.name}"
    epoch = None
    for name in ATOMIC:
        path = out / name
        if not path.exists():
            continue
        if name.endswith(".pt"):
            state = load_checkpoint(path)  # raises CheckpointError for a partial file
            assert state["epoch"] >= 0 and state["model_state"]
            if name == "last.pt":
                epoch = state["epoch"]
        else:
            json.loads(path.read_text())
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            json.loads(line)
    return epoch


def final_weights(out: Path) -> dict:
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == EPOCHS and len(state["history"]) == EPOCHS
    assert json.loads((out / "result.json").read_text())["epochs"] == EPOCHS
    return state["model_state"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The weights of an uninterrupted run (same seed, one thread)."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("reference") / "run"
    try:
        assert cli.main(train_args(out)) == 0
    finally:
        torch.set_num_threads(before)
    return final_weights(out)


def kill_and_resume(tmp_path: Path, reference: dict, rng: random.Random, capsys) -> dict:
    """One trial: start a run, SIGKILL it at a random moment, check what is left, resume, compare."""
    out = tmp_path / "run"
    proc = start(out)
    phase = rng.choice(["startup", "training", "training", "training"])
    deadline = time.monotonic() + 120
    if phase == "training":  # wait for training to begin (config.json is written just before epoch 1)
        while not (out / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.5))
    else:
        time.sleep(rng.uniform(0.0, 3.0))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # On a fast machine the run can finish between poll() and the signal: then it exits cleanly.
    assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
    finished = proc.returncode == 0
    epoch = check_left_behind(out)
    if (out / "last.pt").exists():
        code = cli.main(train_args(out, EPOCHS, "--resume"))
    else:
        code = cli.main(train_args(out))
    assert code == 0, capsys.readouterr().err
    check_left_behind(out)
    weights = final_weights(out)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), f"{name} differs after kill at epoch {epoch} and --resume"
    stray = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    return {"phase": phase, "killed": not finished, "last_epoch": epoch, "stray_tmp": stray}


def test_kill_during_training_then_resume(tmp_path, reference, keep_torch_threads, capsys):
    outcome = kill_and_resume(tmp_path, reference, random.Random(1), capsys)
    assert outcome["killed"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_kill9_at_random_points_then_resume(tmp_path, reference, keep_torch_threads, capsys, seed):
    outcome = kill_and_resume(tmp_path, reference, random.Random(1000 + seed), capsys)
    log = os.environ.get("ONEBIT_KILL_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps({"seed": seed, **outcome}) + "\n")


def test_metrics_rows_are_not_duplicated_after_resume(tmp_path, keep_torch_threads):
    """A kill between an epoch's metrics row and its checkpoint used to make --resume log that epoch twice."""
    out = tmp_path / "run"
    assert cli.main(train_args(out, 3)) == 0
    rewind_to_epoch(out, 2)  # the kill: the epoch-3 row was written, the epoch-3 checkpoint was not
    assert cli.main(train_args(out, 3, "--resume")) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert [row["epoch"] for row in csv.DictReader((out / "metrics.csv").open())] == ["1", "2", "3"]


# --------------------------------------------------------------------------- a full disk
class FullDisk:
    """A file that accepts ``budget`` bytes, then fails every write with ENOSPC (like a full disk)."""

    def __init__(self, handle, budget: int):
        self._handle = handle
        self._left = budget

    def write(self, data):
        if len(data) > self._left:
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _only_for_checkpoints(real, failing):
    def call(*args, **kwargs):
        return failing(*args, **kwargs) if _is_checkpoint_call(args) else real(*args, **kwargs)

    return call


def _is_checkpoint_call(args) -> bool:
    return any(isinstance(a, (str, Path)) and str(a).endswith(".pt") or isinstance(a, int) and _fd_is_checkpoint(a)
               for a in args)


def _fd_is_checkpoint(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".pt." in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, keep_torch_threads, where):
    out = tmp_path / "run"
    assert cli.main(train_args(out, 2)) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    capsys.readouterr()

    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(onebit_files.os, "fdopen", lambda fd, *a, **k: (
            FullDisk(real_fdopen(fd, *a, **k), 100) if _fd_is_checkpoint(fd) else real_fdopen(fd, *a, **k)))
    elif where == "fsync":
        monkeypatch.setattr(onebit_files.os, "fsync", _only_for_checkpoints(os.fsync, enospc))
    else:
        monkeypatch.setattr(onebit_files.os, "replace", _only_for_checkpoints(os.replace, enospc))

    code = cli.main(train_args(out, 4, "--resume"))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onebit: error: cannot write ")
    assert "No space left on device" in lines[0] and ".pt" in lines[0]
    for name, blob in before.items():  # byte for byte what was there
        assert (out / name).read_bytes() == blob
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the temporary file is removed
    monkeypatch.undo()
    assert cli.main(train_args(out, 4, "--resume")) == 0  # space again: the run goes on from epoch 2
    assert load_checkpoint(out / "last.pt")["epoch"] == 4


# --------------------------------------------------------------------------- atomic_write itself
def test_atomic_write_reports_the_real_cause_of_a_failed_torch_save(tmp_path, monkeypatch):
    """torch.save turns a failing write into "RuntimeError: unexpected pos ..."; atomic_write
    reports the OSError underneath, as a one-line OnebitError that is also an OSError."""
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(3)}, path)
    good = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(onebit_files.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k), 64))
    with pytest.raises(FileWriteError) as info:
        with atomic_write(path) as handle:
            torch.save({"w": torch.zeros(10_000)}, handle)
    assert isinstance(info.value, OnebitError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_atomic_write_passes_other_errors_through(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="not a file problem"):
        with atomic_write(path, "w") as handle:
            handle.write("new")
            raise ValueError("not a file problem")
    with pytest.raises(ConnectionResetError):  # an OSError of the body (a download), not of the file
        with atomic_write(path, "w") as handle:
            raise ConnectionResetError("peer reset")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    """mkstemp creates 0600 files: checkpoints were unreadable to the group, unlike every other file."""
    with atomic_write(tmp_path / "new.json", "w") as handle:
        handle.write("{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "new.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
    os.chmod(tmp_path / "new.json", 0o640)
    with atomic_write(tmp_path / "new.json", "w") as handle:  # an existing file keeps its mode
        handle.write("[]")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640


def test_unwritable_folder_is_a_one_line_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = blocker / "sub" / "x.pt"  # a folder under a regular file: fails even for root
    else:
        os.chmod(tmp_path, 0o500)
        target = tmp_path / "x.pt"
    with pytest.raises(FileWriteError) as info:
        with atomic_write(target) as handle:
            handle.write(b"x")
    assert "\n" not in str(info.value) and str(target) in str(info.value)
