import json
import os
import signal

import pytest
import torch

from onebit.errors import CheckpointError, OnebitError, UnknownNameError
from onebit.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from trainconfigs import rewind_to_epoch


def small(tmp_path, **overrides):
    settings = dict(
        model="binarynet_mlp",
        dataset="digits",
        model_kwargs={"hidden": 128, "depth": 2},
        epochs=2,
        batch_size=64,
        lr=1e-2,
        out=str(tmp_path / "run"),
        progress=False,
        threads=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(path):
    return load_checkpoint(path)["model_state"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_binary_mlp_learns_digits(tmp_path):
    result = train(small(tmp_path, epochs=12, model_kwargs={"hidden": 256}, lr=3e-3))
    assert result.test["accuracy"] >= 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "result.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    summary = json.loads((out / "result.json").read_text())
    assert summary["epochs"] == 12 and summary["test_accuracy"] == result.test["accuracy"]
    assert 50 < summary["peak_rss_mib"] < 16_000  # torch alone is ~200 MiB resident


def test_resume_after_one_epoch_is_bit_exact(tmp_path):
    straight = small(tmp_path / "a", epochs=2, model_kwargs={"hidden": 64, "dropout_hidden": 0.2})
    train(straight)
    first = small(tmp_path / "b", epochs=1, model_kwargs={"hidden": 64, "dropout_hidden": 0.2})
    train(first)
    resumed = small(tmp_path / "b", epochs=2, model_kwargs={"hidden": 64, "dropout_hidden": 0.2}, resume=True)
    result = train(resumed)
    assert result.epochs_run == 2
    assert_same_state(weights(tmp_path / "a" / "run" / "last.pt"), weights(tmp_path / "b" / "run" / "last.pt"))


def test_a_convolutional_network_trains_in_channels_last_and_resumes_bit_exact(tmp_path):
    cnn = dict(model="binarynet_cnn", model_kwargs={"width": 1 / 16})
    train(small(tmp_path / "a", epochs=2, **cnn))
    train(small(tmp_path / "b", epochs=1, **cnn))
    train(small(tmp_path / "b", epochs=2, resume=True, **cnn))
    state = weights(tmp_path / "a" / "run" / "last.pt")
    assert_same_state(state, weights(tmp_path / "b" / "run" / "last.pt"))
    convs = [tensor for tensor in state.values() if tensor.ndim == 4 and tensor.shape[1] > 1]  # 1 channel: both layouts
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in convs)
    # a checkpoint in NHWC still loads into a fresh (NCHW) model and gives the same predictions
    checkpoint = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    model = model_from_checkpoint(checkpoint).eval()
    assert all(p.is_contiguous() for p in model.parameters())
    nhwc = model_from_checkpoint(checkpoint).eval()
    nhwc.to(memory_format=torch.channels_last)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nhwc(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interrupt_after", [5, 21])  # digits, batch 64: 21 batches an epoch
def test_interrupt_mid_epoch_saves_and_resume_is_bit_exact(tmp_path, monkeypatch, interrupt_after):
    config = dict(epochs=2, model_kwargs={"hidden": 64}, optimizer="adam", scheduler="exponential", lr_end=1e-4)
    straight = train(small(tmp_path / "a", **config))

    import onebit.train as train_module

    steps = {"n": 0}
    clip = train_module.clip_latent_weights

    def clip_then_interrupt(model):  # called once per optimizer step
        clip(model)
        steps["n"] += 1
        if steps["n"] == interrupt_after:  # Ctrl-C in the middle, or after the last batch, of the first epoch
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module, "clip_latent_weights", clip_then_interrupt)
    interrupted = train(small(tmp_path / "b", **config))
    monkeypatch.undo()
    assert interrupted.interrupted
    state = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert state["epoch"] == 0 and state["batches_done"] == interrupt_after
    with pytest.raises(OnebitError, match=r"unfinished run \(stopped in epoch 1 of 2\)"):
        train(small(tmp_path / "b", **config))
    resumed = train(small(tmp_path / "b", resume=True, **config))
    assert_same_state(weights(tmp_path / "a" / "run" / "last.pt"), weights(tmp_path / "b" / "run" / "last.pt"))
    # the cut epoch's metrics cover the batches before the Ctrl-C too, so best.pt is chosen as straight
    for mine, theirs in zip(resumed.history, straight.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-12)
        assert (mine["train_accuracy"], mine["val_accuracy"]) == (theirs["train_accuracy"], theirs["val_accuracy"])
    assert_same_state(weights(tmp_path / "a" / "run" / "best.pt"), weights(tmp_path / "b" / "run" / "best.pt"))


@pytest.mark.parametrize("change", [{"seed": 3}, {"lr": 0.02}, {"lr_end": 1e-4}, {"flip": True},
                                    {"val_fraction": 0.2}, {"weight_decay": 1e-4}, {"scheduler_kwargs": {"t0": 1}},
                                    {"optimizer": "sgd", "optimizer_kwargs": {"momentum": 0.5}}])
def test_resume_with_other_settings_is_refused(tmp_path, change):
    train(small(tmp_path, epochs=1, scheduler="sgdr"))
    key = "optimizer" if "optimizer" in change else next(iter(change))
    with pytest.raises(CheckpointError, match=f"cannot resume: {key} was"):
        train(small(tmp_path, epochs=2, scheduler="sgdr", resume=True, **change))


def test_resume_accepts_more_epochs_and_checkpoints_older_than_a_setting(tmp_path):
    from onebit.train import save_checkpoint

    train(small(tmp_path, epochs=1))
    path = tmp_path / "run" / "last.pt"
    state = load_checkpoint(path)
    del state["config"]["optimizer_kwargs"]  # a checkpoint written before the setting existed
    save_checkpoint(path, state)
    assert train(small(tmp_path, epochs=2, resume=True)).epochs_run == 2


def test_tensorboard_holds_each_epoch_once_after_a_resume_and_a_fresh_run(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged_epochs():
        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars("train_loss")]

    train(small(tmp_path, epochs=2))
    shutil.copy(tmp_path / "run" / "last.pt", tmp_path / "epoch2.pt")
    train(small(tmp_path, epochs=3, resume=True))
    # a kill after epoch 3's metrics but before its checkpoint: the resumed run redoes epoch 3
    shutil.copy(tmp_path / "epoch2.pt", tmp_path / "run" / "last.pt")
    train(small(tmp_path, epochs=3, resume=True))
    assert logged_epochs() == [1, 2, 3]
    train(small(tmp_path, epochs=2))  # a fresh run in the same folder starts a fresh log
    assert logged_epochs() == [1, 2]


def test_a_fresh_run_into_an_unfinished_one_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    train(small(tmp_path, epochs=2))
    rewind_to_epoch(out, 1)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "metrics.csv")}
    with pytest.raises(OnebitError, match=r"holds an unfinished run \(1 of 2 epochs done\): continue it with --resume"):
        train(small(tmp_path, epochs=2))
    assert {name: (out / name).read_bytes() for name in before} == before
    with pytest.raises(OnebitError, match="give one"):
        small(tmp_path, resume=True, overwrite=True)
    assert train(small(tmp_path, epochs=2, overwrite=True)).epochs_run == 2
    assert train(small(tmp_path, epochs=1)).epochs_run == 1  # a finished run may be replaced


def test_resume_rewrites_lost_metrics_files_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    straight = train(small(tmp_path, epochs=2)).history
    rewind_to_epoch(out, 1)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.csv").unlink()
    train(small(tmp_path, epochs=2, resume=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0] == straight[0]
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header and two epochs


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(small(tmp_path, resume=True))


def test_checkpoint_round_trip(tmp_path):
    train(small(tmp_path, epochs=1))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    model = model_from_checkpoint(state)
    assert not model.training
    assert_same_state(model.state_dict(), state["model_state"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "text"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, damage):
    train(small(tmp_path, epochs=1))
    path = tmp_path / "run" / "last.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        for i in range(0, len(data), 97):
            data[i] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        state = load_checkpoint(path)
        model_from_checkpoint(state)


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "onebit-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(OnebitError, match="epochs"):
        small(tmp_path, epochs=0)
    with pytest.raises(UnknownNameError, match="binarynet_mlp"):
        train(small(tmp_path, model="no_such_model"))
    with pytest.raises(UnknownNameError, match="digits"):
        train(small(tmp_path, dataset="no_such_data"))


# --------------------------------------------------------------------------- numerical guards
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import onebit.train as train_module

    real = train_module.get_loss

    def poisoned(name):
        loss, calls = real(name), [0]

        def fn(logits, y):
            calls[0] += 1
            value = loss(logits, y)
            return value * float("nan") if calls[0] > 45 else value  # digits, batch 64: 21 batches an epoch

        return fn

    monkeypatch.setattr(train_module, "get_loss", poisoned)
    config = small(tmp_path, epochs=4)
    with pytest.raises(OnebitError, match="loss became nan at epoch 3.*last.pt"):
        train(config)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_nan_weights_or_statistics_stop_the_run_before_they_are_saved(tmp_path, monkeypatch):
    import onebit.train as train_module

    real, steps = train_module.clip_latent_weights, [0]

    def clip_then_poison(model):
        real(model)
        steps[0] += 1
        if steps[0] == 30:  # in epoch 2: a BatchNorm running statistic becomes NaN
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)).running_var.fill_(float("nan"))

    monkeypatch.setattr(train_module, "clip_latent_weights", clip_then_poison)
    with pytest.raises(OnebitError, match="NaN/Inf at epoch 2.*running_var"):
        train(small(tmp_path, epochs=3))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())


@pytest.mark.parametrize("lr", [1e-3, 0.5, 50.0])
def test_latent_weights_stay_within_their_clip_range(tmp_path, lr):
    from onebit.layers import QuantConv2d, QuantLinear

    train(small(tmp_path, epochs=1, lr=lr, optimizer="sgd"))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))
    clipped = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_clip is not None]
    assert clipped
    for layer in clipped:
        assert layer.weight.abs().max() <= layer.weight_clip


def test_recompute_bn_sets_the_statistics_from_the_training_set(tmp_path):
    from onebit.data import BatchLoader, load_dataset, split_validation

    train(small(tmp_path / "plain"))
    result = train(small(tmp_path / "recomputed", recompute_bn=True))
    plain = weights(tmp_path / "plain" / "run" / "last.pt")
    recomputed = weights(tmp_path / "recomputed" / "run" / "last.pt")
    statistics = [k for k in plain if "running_" in k or "num_batches_tracked" in k]
    assert statistics
    for key in plain:  # the same training; only the batch norms' statistics differ
        if key not in statistics:
            assert torch.equal(plain[key], recomputed[key]), key
    assert not torch.allclose(plain[statistics[0]], recomputed[statistics[0]])

    # the first BN's mean is the mean of its input over the training split (un-augmented)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "plain" / "run" / "last.pt"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    seen = []
    norms[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    data, _ = split_validation(load_dataset("digits", "train"), 0.1, seed=0)
    with torch.no_grad():
        for x, _ in BatchLoader(data, 500):
            model(x)
    first = next(k for k in statistics if k.endswith("running_mean"))
    expected = torch.cat(seen).mean(0)
    assert torch.allclose(recomputed[first], expected, rtol=0.02, atol=0.02 * float(expected.abs().mean()))
    assert not torch.allclose(plain[first], expected, rtol=0.02, atol=0.02 * float(expected.abs().mean()))

    # best.pt (the last epoch here) and the reported test accuracy use the recomputed statistics
    best = weights(tmp_path / "recomputed" / "run" / "best.pt")
    assert all(torch.equal(best[k], recomputed[k]) for k in statistics)
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "recomputed" / "run" / "last.pt"))
    with torch.no_grad():
        hits = sum(int((reloaded(x).argmax(1) == y).sum()) for x, y in BatchLoader(load_dataset("digits", "test"), 500))
    assert hits / len(load_dataset("digits", "test").labels) == pytest.approx(result.test["accuracy"])


def test_a_stochastic_network_is_evaluated_with_the_batch_norm_statistics_of_its_deterministic_form(tmp_path):
    from onebit.data import BatchLoader, load_dataset, split_validation
    from onebit.layers import recompute_batchnorm

    result = train(small(tmp_path, model="binaryconnect_mlp", model_kwargs={"hidden": 128, "depth": 2,
                                                                            "weight_quantizer": "stochastic_sign"}))
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    data, _ = split_validation(load_dataset("digits", "train"), 0.1, seed=0)
    model = model_from_checkpoint(saved)
    recompute_batchnorm(model, (x for x, _ in BatchLoader(data, 256)))
    state = model.state_dict()
    statistics = [k for k in state if "running_" in k]
    assert statistics
    for key in statistics:  # the checkpoint already holds them: eval and export see the network they run
        assert torch.allclose(saved["model_state"][key], state[key], rtol=1e-5, atol=1e-5), key
    reloaded = model_from_checkpoint(saved)
    with torch.no_grad():
        hits = sum(int((reloaded(x).argmax(1) == y).sum()) for x, y in BatchLoader(load_dataset("digits", "test"), 500))
    assert hits / len(load_dataset("digits", "test").labels) == pytest.approx(result.test["accuracy"])


def test_resume_drops_a_metrics_row_cut_by_a_kill(tmp_path):
    train(small(tmp_path, epochs=2))
    out = tmp_path / "run"
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 3, "train_lo')  # a kill in the middle of the append
    with (out / "metrics.csv").open("a") as handle:
        handle.write("3,0.5,")
    train(small(tmp_path, epochs=3, resume=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (out / "metrics.csv").read_text().count("\n") == 4  # header and three epochs
