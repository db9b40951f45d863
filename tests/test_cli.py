import json
import subprocess
import sys

import pytest

from onebit.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True, timeout=300)


def test_train_eval_summary_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "binarynet_mlp", "--dataset", "digits", "-m", "hidden=128", "--epochs", "3",
                 "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    assert main(["eval", str(out / "best.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["confusion"]) == 10
    assert main(["eval", str(out / "last.pt")]) == 0
    assert "confusion matrix" in capsys.readouterr().out


def test_summary_table_and_json(capsys):
    assert main(["summary", "binarynet_mlp"]) == 0
    table = capsys.readouterr().out
    assert "compression vs float32" in table and "binary MACs" in table
    assert main(["summary", "binarynet_cnn", "-m", "width=0.25", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["binary_mac_fraction"] > 0.9
    assert data["compression"] > 20


@pytest.mark.parametrize("command", ["models", "datasets", "quantizers"])
def test_listings(command, capsys):
    assert main([command]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 3
    assert all(len(line.split()) >= 2 for line in lines), lines


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "no_such_model", "--epochs", "1"], "binarynet_mlp"),
        (["train", "binarynet_mlp", "--dataset", "no_such_data"], "digits"),
        (["train", "binarynet_mlp", "--optimizer", "no_such_opt", "--epochs", "1"], "adam"),
        (["summary", "binarynet_mlp", "-m", "no_such_arg=3"], "no_such_arg"),
        (["eval", "missing.pt"], "does not exist"),
        (["train", "binarynet_mlp", "--dataset", "mnist", "--data-dir", "/nonexistent"], "mnist"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONEBIT_OFFLINE", "1")
    result = run_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onebit: error:") and expected in lines[0]


def test_corrupted_checkpoint_cli(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    result = run_cli("eval", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.pt" in result.stderr
