import dataclasses
import json
import shlex

import pytest
import torch

from onebit.cli import main as cli_main

from onebit import report
from onebit.errors import OnebitError
from onebit.memory import saved_activation_bytes
from onebit.models import create_model
from onebit.recipes import recipe_config
from onebit.train import load_checkpoint, train
from trainconfigs import digits_config


def tiny(out, **overrides):
    return digits_config(out, model_kwargs={"hidden": 32, "depth": 1}, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real digits runs (binary and its float twin) plus hand-written run folders."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny(root / "bnn_digits", lr_scaling=True, loss="square_hinge", scheduler="exponential", lr_end=1e-3))
    train(tiny(root / "float_digits", model="float_mlp"))
    # a run with config.json and no checkpoint, matching the paper's BinaryNet MNIST setting
    fake = root / "nested" / "bnn_mnist"
    fake.mkdir(parents=True)
    config = dataclasses.asdict(recipe_config("binarynet_mnist", epochs=3, out="runs/bnn_mnist"))
    (fake / "config.json").write_text(json.dumps(config))
    (fake / "result.json").write_text(json.dumps(
        {"model": "binarynet_mlp", "dataset": "mnist", "epochs": 3, "seconds": 4000.0, "test_accuracy": 0.985,
         "test_loss": 0.1, "interrupted": False}))
    (fake / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.9 + e / 100, "lr": 1e-3, "seconds": 1000.0,
                    "val_loss": 1 / e, "val_accuracy": 0.95 + e / 100}) + "\n" for e in (1, 2, 3)))
    # a bare run: result.json only
    bare = root / "bare"
    bare.mkdir()
    (bare / "result.json").write_text(json.dumps(
        {"model": "xnor_cnn", "dataset": "cifar10", "epochs": 1, "seconds": 10.0, "test_accuracy": 0.5,
         "test_loss": 1.0}))
    return root


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "results.md"
    found = report.build_report([runs], out)
    return out, found


def test_reads_every_run(built):
    _, found = built
    assert sorted(r.name for r in found) == ["bare", "bnn_digits", "bnn_mnist", "float_digits"]
    by_name = {r.name: r for r in found}
    assert len(by_name["bnn_digits"].history) == 2
    assert by_name["bnn_digits"].config["loss"] == "square_hinge"  # from last.pt
    assert by_name["bnn_mnist"].recipe == "binarynet_mnist"  # inferred from config.json
    assert by_name["bare"].config == {}


def test_pairs_binary_runs_with_their_float_twin(built):
    out, found = built
    by_name = {r.name: r for r in found}
    bnn, flt = by_name["bnn_digits"], by_name["float_digits"]
    assert bnn.twin is flt
    assert by_name["bnn_mnist"].twin is None and by_name["bare"].twin is None
    text = out.read_text()
    row = next(line for line in text.splitlines() if "| bnn_digits |" in line)
    assert f"{bnn.error:.2f}%" in row and f"{flt.error:.2f}%" in row
    assert f"{bnn.error - flt.error:+.2f} pp" in row


def test_markdown_has_tables_commands_and_paper_comparison(built):
    out, _ = built
    text = out.read_text()
    assert text.startswith("# Results")
    assert "| # | run | recipe / model | dataset | epochs | wall time | test error | float twin error | gap |" in text
    assert "onebit train binarynet_mlp --dataset digits" in text
    assert "no config.json or checkpoint" in text  # the bare run
    paper = next(line for line in text.splitlines() if line.startswith("| BinaryNet MLP 3×4096, MNIST"))
    assert "0.96%" in paper and "1.50%" in paper and "bnn_mnist (3 epochs)" in paper
    cifar = next(line for line in text.splitlines() if line.startswith("| BinaryNet ConvNet, CIFAR-10"))
    assert "no matching run" in cifar  # the bare xnor_cnn run is not BinaryNet
    assert "66.7 min" in text  # 4000 s


def test_curve_figures(built):
    out, _ = built
    for dataset in ("digits", "mnist"):  # one figure per dataset and architecture: a network with its float twin
        png = out.parent / "figures" / f"curves_{dataset}_mlp.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/curves_{dataset}_mlp.png)" in out.read_text()
    assert sorted(p.name for p in (out.parent / "figures").iterdir()) == ["curves_digits_mlp.png", "curves_mnist_mlp.png"]


def test_curve_panels_put_seeds_together_and_twins_beside_their_run(tmp_path):
    def run(name, model, seed, **settings):
        config = {"model": model, "dataset": "digits", "epochs": 2, "out": f"runs/{name}", "seed": seed, **settings}
        history = [{"epoch": e, "train_accuracy": 0.8, "val_accuracy": 0.7} for e in (1, 2)]
        return report.Run(path=tmp_path / name, result={"test_accuracy": 0.9, "epochs": 2}, config=config,
                          history=history, model_kwargs={"hidden": 32, "depth": 1})

    bin_s0, bin_s1 = run("bin_s0", "binarynet_mlp", 0), run("bin_s1", "binarynet_mlp", 1)
    hinge = run("bin_hinge", "binarynet_mlp", 0, loss="square_hinge")
    twin = run("float", "float_mlp", 0)
    lone_float = run("float_lr", "float_mlp", 0, lr=0.1)
    elsewhere = run("other_dataset", "binarynet_mlp", 0, dataset="mnist")
    runs = [bin_s0, hinge, twin, bin_s1, lone_float, elsewhere]
    report._pair_twins(runs)
    assert bin_s0.twin is twin and hinge.twin is twin
    panels = report.curve_panels(runs, "digits", "mlp")
    named = [([r.name for r in group], [r.name for r in twins]) for group, twins in panels]
    # the seeds share a panel, the twin is drawn beside each run it pairs with, an unpaired float run
    # gets its own panel, and another dataset's run is left out
    assert named == [(["bin_s0", "bin_s1"], ["float"]), (["bin_hinge"], ["float"]), (["float_lr"], [])]
    png = report.plot_curves(runs, "digits", tmp_path / "curves.png", "mlp")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OnebitError, match="no runs with per-epoch metrics on cifar10"):
        report.plot_curves(runs, "cifar10", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_family_joins_a_network_and_its_float_twin():
    def run(model, recipe=None):
        return report.Run(path=None, result={}, config={"model": model}, history=[], model_kwargs={}, recipe=recipe)

    assert {report.family(run("binarynet_mlp")), report.family(run("float_mlp"))} == {"mlp"}
    assert {report.family(run("wrn_1bit", "mcdonnell_wrn_fmnist")), report.family(run("float_wrn"))} == {"wrn"}


def test_command_reproduces_the_run(runs, tmp_path):
    """The report's command, run through the CLI, trains with exactly the recorded configuration."""
    from onebit.cli import main

    original = load_checkpoint(runs / "bnn_digits" / "last.pt")["config"]
    command = report.train_command(original)
    argv = shlex.split(command)[1:]
    at = argv.index("--out")
    argv[at + 1] = str(tmp_path / "again")
    assert main(argv + ["--quiet", "--threads", "1"]) == 0
    again = load_checkpoint(tmp_path / "again" / "last.pt")["config"]
    ignore = {"out", "threads", "progress", "resume"}
    assert {k: v for k, v in again.items() if k not in ignore} == {k: v for k, v in original.items() if k not in ignore}


def test_command_quotes_model_arguments():
    config = dataclasses.asdict(recipe_config("dorefa_svhn", out="runs/d"))
    command = report.train_command(config)
    assert "-m \"input_quantizer_args={'bits': 2}\"" in command
    assert "-m weight_clip=None" in command and "-m 'channels=[64, 128, 256]'" in command
    assert "--lr 0.001 --lr-end 0.00025 --optimizer adam" in command and "--batch-size 128" in command and "--lr-scaling" not in command
    import ast

    tokens = shlex.split(command)
    margs = dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "-m")
    assert ast.literal_eval(margs["input_quantizer_args"]) == {"bits": 2}
    assert margs["weight_quantizer"] == "kbit"


def test_main_and_errors(runs, tmp_path, capsys):
    assert cli_main(["report", str(runs / "bnn_digits"), "-o", str(tmp_path / "r.md")]) == 0
    assert "| bnn_digits |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "figures" / "curves_digits_mlp.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnebitError, match="no run folders"):
        report.build_report([empty], tmp_path / "x.md")
    assert cli_main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "y.md")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_seed_groups_mean_and_std(tmp_path):
    for seed in (0, 1):
        train(tiny(tmp_path / f"ce_s{seed}", epochs=1, seed=seed))
        train(tiny(tmp_path / f"hinge_s{seed}", epochs=1, seed=seed, loss="square_hinge"))
    runs = report.find_runs([tmp_path])
    groups = report.seed_groups(runs)
    assert sorted(sorted(r.name for r in g) for g in groups) == [["ce_s0", "ce_s1"], ["hinge_s0", "hinge_s1"]]
    text = report.render_markdown(runs, {})
    assert "Repeated runs" in text and "loss=square_hinge" in text and "loss=cross_entropy" in text
    ce = next(g for g in groups if g[0].name.startswith("ce"))
    errors = [r.error for r in ce]
    mean = sum(errors) / 2
    std = abs(errors[0] - errors[1]) / 2 ** 0.5
    assert f"{mean:.2f} ± {std:.2f}%" in text


def test_twin_from_the_same_recipe_is_preferred(tmp_path):
    def run(name, model, recipe):
        return report.Run(path=tmp_path / name, result={"test_accuracy": 0.9, "epochs": 4}, config={
            "model": model, "dataset": "digits"}, history=[], model_kwargs={"hidden": 32, "depth": 1}, recipe=recipe)

    other = run("a_float_other_recipe", "float_mlp", "float_fmnist")
    same = run("b_float_same_recipe", "float_mlp", "binarynet_fmnist_flip (float twin)")
    binary = run("binary", "binarynet_mlp", "binarynet_fmnist_flip")
    report._pair_twins([other, same, binary])
    assert binary.twin is same  # same epochs, architecture and recipe beat the path order


def test_twin_trained_like_the_run_is_preferred_and_other_settings_are_shown(tmp_path):
    def run(name, model, error, **settings):
        config = {"model": model, "dataset": "digits", "epochs": 4, "flip": True, "lr_scaling": model != "float_mlp",
                  "out": f"runs/{name}", "seed": 0, **settings}
        return report.Run(path=tmp_path / name, result={"test_accuracy": 1 - error / 100, "epochs": config["epochs"]},
                          config=config, history=[], model_kwargs={"hidden": 32, "depth": 1})

    like = run("a_like", "float_mlp", 9.0, seed=3)  # seed, out and lr_scaling may differ
    unlike = run("b_unlike", "float_mlp", 8.0, flip=False)
    binary = run("binary", "binarynet_mlp", 10.0)
    longer = run("binary_longer", "binarynet_mlp", 10.0, epochs=8)
    report._pair_twins([unlike, like, binary, longer])
    assert binary.twin is like and report.twin_differences(binary, like) == []
    assert longer.twin is like and report.twin_differences(longer, like) == ["epochs=4"]
    seed3 = run("binary_seed3", "binarynet_mlp", 10.0, seed=3)
    report._pair_twins([run("0_float_seed0", "float_mlp", 9.0), like, seed3])
    assert seed3.twin is like  # the same seed breaks the tie
    table = report.render_markdown([unlike, like, binary, longer], {})
    assert "| 9.00% (a_like) | +1.00 pp |" in table
    assert "| 9.00% (a_like; trained with epochs=4) | +1.00 pp |" in table


def test_repeated_runs_show_their_float_twin_group_and_the_gap_of_means(tmp_path):
    def run(name, model, error, seed, **settings):
        config = {"model": model, "dataset": "digits", "epochs": 4, "lr_scaling": model != "float_mlp",
                  "out": f"runs/{name}", "seed": seed, **settings}
        return report.Run(path=tmp_path / name, result={"test_accuracy": 1 - error / 100, "epochs": 4},
                          config=config, history=[], model_kwargs={"hidden": 32, "depth": 1})

    runs = [run("bin_s0", "binarynet_mlp", 10.0, 0), run("bin_s1", "binarynet_mlp", 12.0, 1),
            run("float_s0", "float_mlp", 8.0, 0), run("float_s1", "float_mlp", 8.5, 1),
            run("bin_hinge_s0", "binarynet_mlp", 11.0, 0, loss="square_hinge"),
            run("bin_hinge_s1", "binarynet_mlp", 11.0, 1, loss="square_hinge")]
    report._pair_twins(runs)
    table = report.render_markdown(runs, {})
    rows = {line.split(" | ")[-1].rstrip(" |"): line for line in table.splitlines() if "± " in line}
    plain, hinge, floats = rows["bin_s0, bin_s1"], rows["bin_hinge_s0, bin_hinge_s1"], rows["float_s0, float_s1"]
    assert "| 11.00 ± 1.41% | 8.25 ± 0.35% | +2.75 pp |" in plain
    assert "| 11.00 ± 0.00% | 8.25 ± 0.35% | +2.75 pp |" in hinge
    assert "| (float) | — |" in floats
    # each group is told apart from its nearest neighbour only
    assert "| loss=square_hinge |" in hinge and "| loss=cross_entropy |" in plain
    assert "model=float_mlp" in floats and "loss" not in floats


def test_repeated_runs_name_a_left_out_model_argument_as_the_model_default(tmp_path):
    def run(name, seed, **model_kwargs):
        config = {"model": "binarynet_mlp", "dataset": "digits", "seed": seed, "model_kwargs": model_kwargs}
        return report.Run(path=tmp_path / name, result={"test_accuracy": 0.9, "epochs": 2}, config=config,
                          history=[], model_kwargs=model_kwargs)

    runs = [run("wide_s0", 0), run("wide_s1", 1), run("narrow_s0", 0, hidden=64), run("narrow_s1", 1, hidden=64)]
    table = report.render_markdown(runs, {})
    rows = {line.split(" | ")[-1].rstrip(" |"): line for line in table.splitlines() if "± " in line}
    assert "| -m hidden (model default) |" in rows["wide_s0, wide_s1"]
    assert "| -m hidden=64 |" in rows["narrow_s0, narrow_s1"]


def test_settings_that_other_settings_make_moot_do_not_split_repeats(tmp_path):
    def run(name, seed, **settings):
        config = {"model": "binarynet_mlp", "dataset": "digits", "seed": seed, **settings}
        return report.Run(path=tmp_path / name, result={"test_accuracy": 0.9, "epochs": 2}, config=config,
                          history=[], model_kwargs={})

    # a crop padding without augmentation, distillation settings without a teacher, a setting the
    # folder predates (counted as its default): all the same experiment
    runs = [run("a", 0, augment=False, crop_padding=2), run("b", 1, distill_weight=0.9),
            run("c", 2, teacher=None, distill_weight=0.5, distill_temperature=4.0)]
    assert [len(g) for g in report.seed_groups(runs)] == [3]
    distilled = [run("d", 0, teacher="t.pt", distill_weight=0.9), run("e", 1, teacher="t.pt", distill_weight=0.5)]
    assert report.seed_groups(distilled) == []


def test_command_reproduces_augmentation_optimizer_schedule_and_memory_options(tmp_path):
    from onebit.cli import main

    original = dataclasses.asdict(tiny(tmp_path / "first", model="float_mlp", epochs=1, augment=True, crop_padding=1,
                                       flip=True, cutout=2, compressed="rounded", recompute_bn=True, scheduler="sgdr",
                                       scheduler_kwargs={"t0": 1}, optimizer="sgd", lr=0.01,
                                       optimizer_kwargs={"momentum": 0.5, "nesterov": True}))
    argv = shlex.split(report.train_command(original))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv + ["--quiet", "--threads", "1"]) == 0
    again = load_checkpoint(tmp_path / "again" / "last.pt")["config"]
    ignore = {"out", "threads", "progress", "resume"}
    assert {k: v for k, v in again.items() if k not in ignore} == {k: v for k, v in original.items() if k not in ignore}


def test_command_leaves_out_the_crop_of_a_run_without_augmentation():
    config = dataclasses.asdict(recipe_config("binarynet_cnn_fmnist_wide", augment=False, out="runs/c"))
    command = report.train_command(config)
    assert "--crop-padding" not in command and "--augment" not in command and "--flip" in command


def test_memory_section_lists_runs_that_measured_their_peak(tmp_path):
    def wrn_run(name, compressed):
        return report.Run(path=tmp_path / name, result={"test_accuracy": 0.9, "epochs": 2, "seconds": 300.0,
                                                        "peak_rss_mib": 1234.5},
                          config={"model": "wrn_1bit", "dataset": "digits", "compressed": compressed, "batch_size": 125},
                          history=[], model_kwargs={"depth": 8, "width": 1})

    plain = report.Run(path=tmp_path / "old", result={"test_accuracy": 0.9, "epochs": 2},
                       config={"model": "binarynet_mlp", "dataset": "digits"}, history=[], model_kwargs={})
    from_checkpoint = wrn_run("wrn_ckpt", None)  # a folder with last.pt: its model_kwargs hold the input shape
    from_checkpoint.model_kwargs.update(in_shape=[1, 8, 8], num_classes=10)
    assert report._saved_activation_mib(from_checkpoint) == report._saved_activation_mib(wrn_run("wrn", None)) > 0
    text = report.render_markdown([wrn_run("wrn_comp", "stochastic"), wrn_run("wrn", None), plain], {})
    section = text.split("## Memory and time per epoch", 1)[1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in section.splitlines() if line.startswith("| wrn")}
    # run, recipe, compressed, batch, s/epoch, saved, peak RSS (1234.5 rounds to even)
    assert rows["wrn_comp"][2:] == ["stochastic", "125", "150 s", rows["wrn_comp"][5], "1,234 MiB |"]
    assert rows["wrn"][2] == "—"
    compressed_mib, float_mib = (float(rows[k][5].removesuffix(" MiB")) for k in ("wrn_comp", "wrn"))
    assert 0 < compressed_mib < float_mib / 16  # WRN-8-1 on 8x8 digits: about 0.19 vs 4.7 MiB
    model = create_model("wrn_1bit", in_shape=(1, 8, 8), num_classes=10, depth=8, width=1).train()
    expected = saved_activation_bytes(model, torch.zeros(125, 1, 8, 8)).activations / 2**20
    assert float_mib == pytest.approx(expected, abs=0.05)
    assert "| old |" not in section


def test_compressed_runs_are_set_against_their_exact_gradient_run(tmp_path):
    def wrn_run(name, compressed, seed, accuracy, lr=0.1):
        return report.Run(path=tmp_path / name, result={"test_accuracy": accuracy, "epochs": 2, "seconds": 200.0},
                          config={"model": "wrn_1bit", "dataset": "digits", "compressed": compressed, "seed": seed,
                                  "lr": lr},
                          history=[], model_kwargs={"depth": 8, "width": 1})

    runs = [wrn_run("exact_s0", None, 0, 0.90), wrn_run("exact_s1", None, 1, 0.80),
            wrn_run("rounded_s1", "rounded", 1, 0.79), wrn_run("mean_s0_other_lr", "mean", 0, 0.5, lr=0.2)]
    assert [(c.name, e.name) for c, e in report.compressed_pairs(runs)] == [("rounded_s1", "exact_s1")]
    text = report.render_markdown(runs, {})
    section = text.split("## What compressed learning costs", 1)[1].split("##", 1)[0]
    assert "| rounded_s1 | rounded | 21.00% | exact_s1 | 20.00% | +1.00 pp | 100 s vs 100 s |" in section
    assert "mean_s0_other_lr" not in section
    assert "What compressed learning costs" not in report.render_markdown(runs[:2], {})


def test_twin_differences_leave_out_settings_moot_for_one_of_the_two(tmp_path):
    def run(model, **config):
        return report.Run(path=tmp_path / model, result={"test_accuracy": 0.9}, config={"model": model, **config},
                          history=[], model_kwargs={})

    distilled = run("binarynet_mlp", teacher="teacher.pt", distill_weight=0.9)
    assert report.twin_differences(distilled, run("float_mlp")) == ["teacher=None"]
    assert report.twin_differences(distilled, run("float_mlp", teacher="teacher.pt")) == ["distill_weight=0.5"]
