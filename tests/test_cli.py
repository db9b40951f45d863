import json
import subprocess
import sys

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    assert main(["train", "binarynet_mlp", "--dataset", "digits", "-m", "hidden=128", "--epochs", "2",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    return out


def test_export_then_run_matches_pytorch_eval(trained_digits, tmp_path, capsys):
    import numpy as np

    model_file = tmp_path / "digits.onebit"
    assert main(["export", str(trained_digits / "best.pt"), "-o", str(model_file)]) == 0
    assert "smaller than the float32 weights" in capsys.readouterr().out
    assert main(["eval", str(trained_digits / "best.pt"), "--json"]) == 0
    torch_accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    for kernel in ("numpy", None):
        assert main(["run", str(model_file), "-d", "digits", "--json", *(["--kernel", kernel] if kernel else [])]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["accuracy"] == torch_accuracy  # BinaryNet is bit-exact: the same predictions
        assert result["samples"] == 359

    x = np.random.default_rng(0).uniform(-1, 1, size=(5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(model_file), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "logits.npy")]) == 0
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (5, 10)
    assert main(["run", str(model_file), "--input", str(tmp_path / "x.npy")]) == 0
    assert capsys.readouterr().out.split()[-5:] == [str(v) for v in logits.argmax(axis=1)]


def test_export_onnx_runs_in_onnxruntime(trained_digits, tmp_path, capsys):
    import numpy as np

    ort = pytest.importorskip("onnxruntime")
    import torch

    from onebit.train import load_checkpoint, model_from_checkpoint

    onnx_file = tmp_path / "digits.onnx"
    assert main(["export", str(trained_digits / "best.pt"), "--format", "onnx", "-o", str(onnx_file)]) == 0
    x = np.random.default_rng(1).uniform(-1, 1, size=(7, 1, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(onnx_file)).run(None, {"input": x})[0]
    with torch.inference_mode():
        want = model_from_checkpoint(load_checkpoint(trained_digits / "best.pt"))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_export_run_user_errors(trained_digits, tmp_path):
    import numpy as np

    model_file = tmp_path / "m.onebit"
    assert main(["export", str(trained_digits / "best.pt"), "-o", str(model_file)]) == 0
    truncated = tmp_path / "truncated.onebit"
    truncated.write_bytes(model_file.read_bytes()[:-100])
    np.save(tmp_path / "wrong.npy", np.zeros((2, 1, 28, 28), dtype=np.float32))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    cases = [
        (["export", str(tmp_path / "missing.pt")], "does not exist"),
        (["run", str(tmp_path / "missing.onebit"), "-d", "digits"], "missing.onebit"),
        (["run", str(truncated), "-d", "digits"], "truncated.onebit"),
        (["run", str(model_file)], "--dataset"),
        (["run", str(model_file), "-d", "digits", "--kernel", "gpu9000"], "gpu9000"),
        (["run", str(model_file), "--input", str(tmp_path / "wrong.npy")], "shape"),
        (["run", str(model_file), "--input", str(tmp_path / "junk.npy")], "junk.npy"),
        (["run", str(model_file), "-d", "fashion_mnist", "--data-dir", str(tmp_path)], "fashion"),
    ]
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True,
                                timeout=300, env={**__import__("os").environ, "ONEBIT_OFFLINE": "1"})
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onebit: error:") and expected in lines[0], (args, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.npy", "m.onebit", "truncated.onebit", "wrong.npy"]


def test_parser_builds_without_torch():
    # `onebit run` must work where torch is not installed: building the parser imports no torch
    code = ("import sys; sys.modules['torch'] = None\n"
            "from onebit.cli import build_parser\n"
            "args = build_parser().parse_args(['run', 'm.onebit', '-d', 'digits'])\n"
            "assert args.model_file == 'm.onebit'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_train_passes_optimizer_options_and_rejects_unknown_ones(tmp_path):
    out = tmp_path / "bop"
    assert main(["train", "binarynet_mlp", "--dataset", "digits", "-m", "hidden=32", "--epochs", "1",
                 "--threads", "1", "--quiet", "--optimizer", "bop", "--optimizer-arg", "threshold=1e-6",
                 "--optimizer-arg", "gamma=1e-2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer_kwargs"] == {"threshold": 1e-6, "gamma": 1e-2}
    state = torch.load(out / "last.pt", weights_only=True)
    bop_group = state["optimizer_state"]["bop"]["param_groups"][0]
    assert bop_group["threshold"] == 1e-6 and bop_group["initial_lr"] == pytest.approx(1e-2)  # γ, not Adam's lr 1e-3
    bad = run_cli("train", "float_mlp", "--dataset", "digits", "--epochs", "1", "--optimizer", "sgd",
                  "--optimizer-arg", "gamma=0.1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'sgd' does not take 'gamma'; its options: momentum, nesterov" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_train_refuses_to_start_over_an_unfinished_run(tmp_path):
    from trainconfigs import rewind_to_epoch

    out = tmp_path / "run"
    args = ("train", "float_mlp", "--dataset", "digits", "-m", "hidden=16", "--epochs", "2", "--threads", "1",
            "--quiet", "--out", str(out))
    assert main(list(args)) == 0
    rewind_to_epoch(out, 1)
    refused = run_cli(*args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().endswith(f"{out} holds an unfinished run (1 of 2 epochs done): continue it with "
                                           "--resume, or start afresh there with --overwrite")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # untouched
    assert run_cli(*args, "--resume", "--overwrite").returncode == 2
    assert main([*args, "--overwrite"]) == 0


def test_train_with_crop_flip_cutout_schedule_args_and_compressed_learning(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "float_mlp", "--dataset", "digits", "-m", "hidden=32", "--epochs", "2", "--threads", "1",
                 "--quiet", "--crop-padding", "2", "--flip", "--cutout", "3", "--compressed", "stochastic",
                 "--scheduler", "sgdr", "--scheduler-arg", "t0=1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["flip"], config["cutout"], config["compressed"]) == (True, 3, "stochastic")
    assert (config["augment"], config["crop_padding"]) == (True, 2)  # --crop-padding implies --augment
    assert config["scheduler_kwargs"] == {"t0": 1}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(1e-3)  # SGDR restarted after t0 = 1 epoch
    bad = run_cli("train", "float_mlp", "--dataset", "digits", "--epochs", "1", "--scheduler", "sgdr",
                  "--scheduler-arg", "nope=1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()  # a bad setting leaves no output folder behind
    bad = run_cli("train", "float_mlp", "--dataset", "digits", "--epochs", "1", "--crop-padding", "-1",
                  "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "crop padding" in bad.stderr and "Traceback" not in bad.stderr


def test_memory_command_small(capsys):
    assert main(["memory", "--depth", "8", "--width", "1", "--batch", "4", "--size", "8", "--no-rss"]) == 0
    printed = capsys.readouterr().out
    assert "WRN-8-1" in printed and "saved 1/" in printed


def test_no_augment_and_no_flip_turn_a_recipes_augmentation_off():
    from onebit.cli import build_parser

    args = build_parser().parse_args(["train", "--recipe", "binarynet_cnn_fmnist_wide", "--no-augment", "--no-flip"])
    assert (args.augment, args.flip) == (False, False)
    assert build_parser().parse_args(["train", "x"]).augment is None  # unset: the recipe decides


def test_every_memory_code_is_a_compressed_choice():
    from onebit.cli import build_parser
    from onebit.memory import CODES

    for code in CODES:
        assert build_parser().parse_args(["train", "float_mlp", "--compressed", code]).compressed == code
    bad = run_cli("train", "float_mlp", "--compressed", "bogus")
    assert bad.returncode == 2 and "bogus" in bad.stderr and all(code in bad.stderr for code in CODES)


def test_recompute_bn_flag_turns_a_recipes_setting_on_and_off():
    from onebit.cli import build_parser
    from onebit.recipes import recipe_config

    parse = lambda *extra: build_parser().parse_args(["train", "--recipe", "mcdonnell_wrn_fmnist", *extra])  # noqa: E731
    assert parse().recompute_bn is None  # unset: the recipe decides
    assert recipe_config("mcdonnell_wrn_fmnist", recompute_bn=parse().recompute_bn, out="x").recompute_bn is True
    off = parse("--no-recompute-bn").recompute_bn
    assert off is False and recipe_config("mcdonnell_wrn_fmnist", recompute_bn=off, out="x").recompute_bn is False
    assert build_parser().parse_args(["train", "float_mlp", "--recompute-bn"]).recompute_bn is True


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "binarynet_mlp", "--dataset", "digits", "-m", "hidden=32", "--epochs", "1",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    return out / "last.pt"


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-2"], "threads must be at least 1"),
    (["--seed", "99999999999999999999999"], "seed must be in"),
    (["--scheduler", "cosine", "--lr-end", "-1"], "final learning rate must be a number"),
    (["--optimizer", "sgd", "--optimizer-arg", "momentum=nan"], "momentum must be a finite number"),
    (["--optimizer", "sgd", "--optimizer-arg", "nesterov=5"], "nesterov must be True or False"),
    (["--scheduler", "sgdr", "--scheduler-arg", "t0=nan"], "t0 must be a finite number"),
    (["-m", "in_shape=(1,4,4)"], "come from the dataset"),
])
def test_bad_training_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main(["train", "binarynet_mlp", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_train_into_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(["train", "binarynet_mlp", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(taken)]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err and taken.read_text() == "mine"


def test_export_and_run_never_overwrite_their_input(tiny_checkpoint, tmp_path, capsys):
    copy = tmp_path / "c.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    before = copy.read_bytes()
    assert main(["export", str(copy), "-o", str(copy)]) == 2
    assert "is the input file" in capsys.readouterr().err and copy.read_bytes() == before
    model = tmp_path / "m.onebit"
    assert main(["export", str(copy), "-o", str(model)]) == 0
    assert "x smaller than the float32 weights" in capsys.readouterr().out
    kept = model.read_bytes()
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 8, 8), np.float32))
    for output in (model, x):
        assert main(["run", str(model), "--input", str(x), "-o", str(output)]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert model.read_bytes() == kept
    assert main(["run", str(model), "--dataset", "digits", "-o", str(tmp_path / "l.npy")]) == 2
    assert "--output writes the logits of --input" in capsys.readouterr().err


def test_checkpoint_and_model_file_mixups_are_named(tiny_checkpoint, capsys):
    assert main(["run", str(tiny_checkpoint), "--dataset", "digits"]) == 2
    assert "a zip archive (a PyTorch checkpoint?), not a .onebit file" in capsys.readouterr().err
    assert main(["eval", str(tiny_checkpoint.parent)]) == 2
    assert "is a folder; give a checkpoint file such as" in capsys.readouterr().err


def test_report_and_robustness_check_their_outputs_before_writing_any(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["report", str(tiny_checkpoint.parent), "-o", str(folder)]) == 2
    assert "it is a folder" in capsys.readouterr().err and not (tmp_path / "figures").exists()
    plot = tmp_path / "r.png"
    assert main(["robustness", str(tiny_checkpoint), "--plot", str(plot), "--json", str(folder), "--limit", "20"]) == 2
    assert "it is a folder" in capsys.readouterr().err and not plot.exists()


def test_command_line_syntax_errors_are_one_line(capsys):
    for argv in (["run", "m.onebit", "--batch-size", "0"], ["train", "--epochs", "x"], ["nosuch"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--help" in err, err
