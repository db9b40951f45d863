"""Knowledge distillation: the teacher's outputs, training a student with them, resuming, and bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from onebit.data import load_dataset
from onebit.distill import Teacher
from onebit.errors import CheckpointError, OnebitError
from onebit.report import train_command
from onebit.train import load_checkpoint, model_from_checkpoint, train
from trainconfigs import digits_config


def digits_run(out, **overrides):
    return digits_config(out, **{"model_kwargs": {"hidden": 128, "depth": 2}, **overrides})


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    result = train(digits_run(out, model="float_mlp", epochs=6, model_kwargs={"hidden": 128}, lr=3e-3))
    assert result.test["accuracy"] > 0.9
    return out / "best.pt"


def test_teacher_answers_like_its_model_and_remembers_a_dataset(teacher_checkpoint):
    data = load_dataset("digits", "train")
    teacher = Teacher(teacher_checkpoint, (1, 8, 8), 10)
    reference = model_from_checkpoint(load_checkpoint(teacher_checkpoint))
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(teacher.logits(x), reference(x))
    teacher.remember(data)
    indices = torch.tensor([5, 0, 17])
    from onebit.data import to_float

    images = to_float(data.images[indices.numpy()], data.max_value)
    with torch.no_grad():
        assert torch.allclose(teacher.logits(images, indices), reference(images), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_for_other_inputs_or_classes_is_refused(teacher_checkpoint):
    with pytest.raises(CheckpointError, match=r"takes inputs \(1, 8, 8\) with 10 classes"):
        Teacher(teacher_checkpoint, (1, 28, 28), 10)
    with pytest.raises(CheckpointError, match="with 3 classes"):
        Teacher(teacher_checkpoint, (1, 8, 8), 3)


def test_distilled_student_learns_and_its_command_reproduces_it(teacher_checkpoint, tmp_path):
    config = digits_run(tmp_path, epochs=8, lr=3e-3, teacher=str(teacher_checkpoint), distill_weight=0.7,
                        distill_temperature=3.0)
    result = train(config)
    assert result.test["accuracy"] >= 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    command = train_command(load_checkpoint(tmp_path / "last.pt")["config"])
    assert f"--teacher {teacher_checkpoint}" in command
    assert "--distill-weight 0.7 --distill-temperature 3.0" in command


def test_distillation_changes_training_and_weight_zero_does_not(teacher_checkpoint, tmp_path):
    plain = train(digits_run(tmp_path / "plain", epochs=1))
    weightless = train(digits_run(tmp_path / "w0", epochs=1, teacher=str(teacher_checkpoint), distill_weight=0.0))
    distilled = train(digits_run(tmp_path / "w1", epochs=1, teacher=str(teacher_checkpoint), distill_weight=1.0))
    assert weightless.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-6)
    assert distilled.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"], rel=1e-3)


@pytest.mark.parametrize("augment", [False, True])
def test_resumed_distillation_is_bit_exact(teacher_checkpoint, tmp_path, augment):
    settings = dict(teacher=str(teacher_checkpoint), flip=augment)
    train(digits_run(tmp_path / "a", **settings))
    train(digits_run(tmp_path / "b", epochs=1, **settings))
    train(digits_run(tmp_path / "b", resume=True, **settings))
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model_state"] for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="teacher"):
        train(digits_run(tmp_path / "b", epochs=3, resume=True, flip=augment))


@pytest.mark.parametrize("settings, message", [
    (dict(distill_weight=1.5), "distillation weight must be in"),
    (dict(distill_temperature=0.0), "distillation temperature must be a positive number"),
])
def test_bad_distillation_settings(settings, message, tmp_path):
    with pytest.raises(OnebitError, match=message):
        digits_run(tmp_path, **settings)


@pytest.mark.parametrize("teacher, expected", [("missing.pt", "does not exist"), ("garbage.pt", "cannot read")])
def test_cli_bad_teacher_is_a_one_line_error(teacher, expected, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip")
    result = subprocess.run([sys.executable, "-m", "onebit", "train", "binarynet_mlp", "--epochs", "1", "--quiet",
                             "--teacher", str(tmp_path / teacher), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onebit: error:") and expected in lines[0], result.stderr
