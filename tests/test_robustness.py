import json

import pytest

from onebit.cli import main as cli_main
import torch

from onebit import robustness as rb
from onebit.data import BatchLoader, load_dataset
from onebit.errors import ConfigError, OnebitError, ShapeError
from onebit.losses import get_loss
from onebit.train import evaluate, load_checkpoint, model_from_checkpoint, train
from trainconfigs import digits_config

SIGMAS = (0.0, 0.5, 2.0)
EPSILONS = (0.0, 0.1, 0.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    paths = []
    train(digits_config(root / "bnn", epochs=3, loss="square_hinge"))
    paths.append(root / "bnn" / "last.pt")
    try:  # 2-bit activations, where the model builders accept quantizer arguments
        train(digits_config(root / "qnn2", epochs=3, model_kwargs={"hidden": 64, "depth": 1, "input_quantizer": "kbit",
                                                "input_quantizer_args": {"bits": 2}}))
        paths.append(root / "qnn2" / "last.pt")
    except OnebitError:
        pass
    train(digits_config(root / "float", model="float_mlp", epochs=3))
    paths.append(root / "float" / "last.pt")
    return paths


@pytest.fixture(scope="module")
def rows(checkpoints):
    return rb.robustness(checkpoints, sigmas=SIGMAS, epsilons=EPSILONS, limit=200, batch_size=64)


def test_rows_shape(rows, checkpoints):
    assert len(rows) == len(checkpoints) * (len(SIGMAS) + len(EPSILONS))
    for row in rows:
        assert set(row) == {"checkpoint", "label", "model", "weight_bits", "activation_bits", "dataset", "attack",
                            "strength", "accuracy", "samples"}
        assert row["dataset"] == "digits" and row["samples"] == 200 and 0 <= row["accuracy"] <= 1
    bits = {r["checkpoint"]: (r["weight_bits"], r["activation_bits"]) for r in rows}
    assert [bits[str(p)] for p in checkpoints] == [(1, 1)] + [(1, 2)] * (len(checkpoints) == 3) + [(32, 32)]
    labels = {r["label"] for r in rows}
    assert "bnn (binarynet_mlp, W1/A1)" in labels and "float (float_mlp, W32/A32)" in labels


def test_zero_strength_is_plain_evaluation(rows, checkpoints):
    data = load_dataset("digits", "test").subset(range(200))
    for path in checkpoints:
        state = load_checkpoint(path)
        plain = evaluate(model_from_checkpoint(state), BatchLoader(data, 64), get_loss(state["config"]["loss"]),
                         10)["accuracy"]
        for attack in ("noise", "fgsm"):
            row = next(r for r in rows if r["checkpoint"] == str(path) and r["attack"] == attack and r["strength"] == 0)
            assert row["accuracy"] == plain


def test_strong_perturbations_hurt(rows):
    for path in {r["checkpoint"] for r in rows}:
        acc = {(r["attack"], r["strength"]): r["accuracy"] for r in rows if r["checkpoint"] == path}
        assert acc[("noise", 2.0)] < acc[("noise", 0.0)]
        assert acc[("fgsm", 0.5)] < acc[("fgsm", 0.0)]
        assert acc[("fgsm", 0.5)] <= acc[("fgsm", 0.1)] + 0.05  # non-increasing, up to noise


def test_fgsm_moves_inputs_by_epsilon_within_range(checkpoints):
    state = load_checkpoint(checkpoints[0])
    model = model_from_checkpoint(state)
    x, y = next(iter(BatchLoader(load_dataset("digits", "test"), 32)))
    adv = rb.fgsm(model, get_loss("square_hinge"), x, y, 0.1)
    assert adv.shape == x.shape and adv.min() >= -1 and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert (adv != x).any()  # the STE gives the binary net an input gradient
    assert torch.equal(rb.fgsm(model, get_loss("square_hinge"), x, y, 0.0), x)


def test_noise_draws_are_paired_and_reproducible(checkpoints):
    a = rb.robustness(checkpoints[:1], sigmas=(0.5,), epsilons=(0.0,), limit=100, seed=3)
    b = rb.robustness(checkpoints[:1], sigmas=(0.5,), epsilons=(0.0,), limit=100, seed=3, batch_size=7)
    assert a[0]["accuracy"] == b[0]["accuracy"]  # the noise of a sample does not depend on batching


def test_json_table_and_plot(rows, checkpoints, tmp_path):
    data = rb.rows_to_json(rows)
    assert data["sigmas"] == list(SIGMAS) and data["epsilons"] == list(EPSILONS)
    assert [c["checkpoint"] for c in data["checkpoints"]] == [str(p) for p in checkpoints]
    assert all(len(c["noise"]) == 3 and len(c["fgsm"]) == 3 for c in data["checkpoints"])
    json.dumps(data)
    table = rb.format_table(rows)
    assert "Gaussian noise" in table and "FGSM" in table and "σ=0.5" in table and "ε=0.1" in table
    png = rb.plot_robustness(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line(checkpoints, tmp_path, capsys):
    argv = [str(p) for p in checkpoints] + ["--sigma", "0", "0.3", "--epsilon", "0", "0.05", "--limit", "50",
                                            "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]
    assert cli_main(["robustness", *argv]) == 0
    out = capsys.readouterr().out
    assert "digits test set, 50 samples" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["sigmas"] == [0.0, 0.3] and len(data["checkpoints"]) == len(checkpoints)
    assert (tmp_path / "p.png").is_file()
    assert cli_main(["robustness", str(checkpoints[0]), "--sigma", "-1"]) == 2
    assert "sigma values must be" in capsys.readouterr().err


def test_errors(checkpoints, tmp_path):
    with pytest.raises(ConfigError):
        rb.robustness([])
    with pytest.raises(ConfigError, match="limit"):
        rb.robustness(checkpoints[:1], limit=0)
    with pytest.raises(ConfigError, match="labels"):
        rb.robustness(checkpoints[:1], labels=["a", "b"])
    with pytest.raises(OnebitError, match="does not exist"):
        rb.robustness([tmp_path / "missing.pt"])
    with pytest.raises(ShapeError, match="expects inputs"):
        rb.robustness(checkpoints[:1], dataset="fashion_mnist", data_dir=str(_fake_fmnist(tmp_path)))


def _fake_fmnist(tmp_path):
    from datafixtures import make_idx_dataset

    folder = tmp_path / "fmnist"
    make_idx_dataset(folder, n_train=4, n_test=4)
    return folder
