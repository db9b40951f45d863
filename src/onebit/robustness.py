"""Robustness of trained checkpoints to input noise and to FGSM adversarial perturbations.

    onebit robustness runs/bnn/best.pt runs/qnn2/best.pt runs/float/best.pt \\
        --sigma 0 0.1 0.2 0.5 --epsilon 0 0.01 0.05 0.1 --plot robustness.png --json robustness.json

For every checkpoint, the test-set accuracy

* under additive Gaussian noise ``x + σ·N(0, 1)``, clamped to the input range [−1, 1] (the
  range :func:`onebit.data.to_float` maps pixels to), for each σ — the same noise draws for
  every checkpoint, so the comparison is paired;
* under FGSM (Goodfellow, Shlens, Szegedy 2015): ``x + ε·sign(∇_x L(f(x), y))``, clamped to
  [−1, 1], with ``L`` the loss the checkpoint was trained with, for each ε.

The input gradient of a binarized network exists thanks to the straight-through estimators of
its quantizers: the first layer takes the real image (its input is never quantized), so ∂L/∂x
is the first layer's weight applied to the surrogate gradient flowing back through the sign
activations (zero where a pre-activation saturated, |x| > 1). Where the whole gradient is zero
the sample is not perturbed (sign(0) = 0) — FGSM then measures the true gradient masking of the
STE, which is part of what is being compared.

σ = 0 and ε = 0 give exactly the plain test accuracy of :func:`onebit.train.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .errors import ConfigError, ShapeError
from .files import atomic_write, check_output_files, save_png

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line can build its parser without it
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_EPSILONS",
    "DEFAULT_SIGMAS",
    "add_arguments",
    "fgsm",
    "format_table",
    "plot_robustness",
    "precision_of",
    "robustness",
    "robustness_json",
    "rows_to_json",
    "run_from_args",
]

DEFAULT_SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
ATTACKS = ("noise", "fgsm")


def precision_of(model: nn.Module) -> tuple[int, int]:
    """(weight bits, activation bits) of the model's quantized layers: the lowest precision among
    the layers that quantize (32 where none does)."""
    from .layers import QuantLayer

    weights, inputs = [], []
    for module in model.modules():
        if isinstance(module, QuantLayer):
            if module.weight_quantizer is not None:
                weights.append(int(getattr(module.weight_quantizer, "precision", 32)))
            if module.input_quantizer is not None:
                inputs.append(int(getattr(module.input_quantizer, "precision", 32)))
    return min(weights, default=32), min(inputs, default=32)


def fgsm(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``clamp(x + ε·sign(∇_x loss(model(x), y)), −1, 1)``, the model in whatever mode it is in."""
    import torch

    if epsilon == 0:
        return x
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return (x.detach() + epsilon * grad.sign()).clamp_(-1.0, 1.0)


def _label(path: Path, model_name: str, bits: tuple[int, int]) -> str:
    run = path.parent.name if path.name in ("last.pt", "best.pt") and path.parent.name else path.stem
    return f"{run} ({model_name}, W{bits[0]}/A{bits[1]})"


def _check_strengths(name: str, values: Iterable[float]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} values must be finite numbers ≥ 0, got {v!r}")
        out.append(float(v))
    if not out:
        raise ConfigError(f"give at least one {name} value")
    return out


def robustness(
    checkpoints: Sequence[str | os.PathLike],
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    sigmas: Iterable[float] = DEFAULT_SIGMAS,
    epsilons: Iterable[float] = DEFAULT_EPSILONS,
    limit: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    labels: Sequence[str] | None = None,
) -> list[dict]:
    """Accuracy of each checkpoint under Gaussian noise of each σ and FGSM of each ε.

    ``dataset`` defaults to the first checkpoint's; ``limit`` keeps the first ``limit`` test
    samples. Returns one row per (checkpoint, attack, strength): ``checkpoint`` (path),
    ``label``, ``model``, ``weight_bits``, ``activation_bits``, ``dataset``, ``attack``
    (``"noise"`` or ``"fgsm"``), ``strength`` (σ or ε), ``accuracy``, ``samples``.
    """
    import torch

    from .data import BatchLoader, load_dataset
    from .losses import get_loss
    from .train import load_checkpoint, model_from_checkpoint

    if not checkpoints:
        raise ConfigError("give at least one checkpoint")
    if labels is not None and len(labels) != len(checkpoints):
        raise ConfigError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    sigmas = _check_strengths("sigma", sigmas)
    epsilons = _check_strengths("epsilon", epsilons)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")

    states = [(Path(p), load_checkpoint(p)) for p in checkpoints]
    first_config = states[0][1]["config"]
    dataset = dataset or first_config["dataset"]
    data = load_dataset(dataset, "test", data_dir=data_dir or first_config.get("data_dir"))
    if limit is not None and limit < len(data):
        data = data.subset(range(limit))
    loader = BatchLoader(data, batch_size)  # in order: sample i always gets noise[i]
    # one standard-normal draw per test input, shared by every σ and every checkpoint (paired comparison)
    noise = torch.randn((len(data), *data.input_shape), generator=torch.Generator().manual_seed(seed))

    rows: list[dict] = []
    for index, (path, state) in enumerate(states):
        expected = tuple(state["model_kwargs"]["in_shape"])
        if data.input_shape != expected:
            raise ShapeError(f"{path}: model expects inputs {expected}, dataset {dataset} has {data.input_shape}")
        if state["model_kwargs"]["num_classes"] < data.num_classes:
            raise ShapeError(f"{path}: model has {state['model_kwargs']['num_classes']} classes, "
                             f"dataset {dataset} has {data.num_classes}")
        model = model_from_checkpoint(state).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        loss_fn = get_loss(state["config"].get("loss", "cross_entropy"))
        bits = precision_of(model)
        base = {
            "checkpoint": str(path),
            "label": labels[index] if labels is not None else _label(path, state["model_name"], bits),
            "model": state["model_name"],
            "weight_bits": bits[0],
            "activation_bits": bits[1],
            "dataset": dataset,
        }
        for sigma in sigmas:
            correct = total = 0
            with torch.no_grad():
                for x, y in loader:
                    if sigma:
                        x = (x + sigma * noise[total : total + len(y)]).clamp_(-1.0, 1.0)
                    correct += int((model(x).argmax(1) == y).sum())
                    total += len(y)
            rows.append({**base, "attack": "noise", "strength": sigma, "accuracy": correct / total, "samples": total})
        for epsilon in epsilons:
            correct = total = 0
            for x, y in loader:
                x_adv = fgsm(model, loss_fn, x, y, epsilon)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == y).sum())
                total += len(y)
            rows.append({**base, "attack": "fgsm", "strength": epsilon, "accuracy": correct / total, "samples": total})
    return rows


def rows_to_json(rows: list[dict]) -> dict:
    """The rows grouped per checkpoint: ``{"dataset", "samples", "sigmas", "epsilons", "checkpoints": [
    {"checkpoint", "label", "model", "weight_bits", "activation_bits", "noise": [acc per σ], "fgsm": [acc per ε]}]}``."""
    out: dict = {"dataset": None, "samples": None, "sigmas": [], "epsilons": [], "checkpoints": []}
    by_path: dict[str, dict] = {}
    for row in rows:
        out["dataset"], out["samples"] = row["dataset"], row["samples"]
        entry = by_path.get(row["checkpoint"])
        if entry is None:
            entry = {k: row[k] for k in ("checkpoint", "label", "model", "weight_bits", "activation_bits")}
            entry.update(noise=[], fgsm=[])
            by_path[row["checkpoint"]] = entry
            out["checkpoints"].append(entry)
        entry[row["attack"]].append(row["accuracy"])
        axis = out["sigmas"] if row["attack"] == "noise" else out["epsilons"]
        if len(entry[row["attack"]]) > len(axis):
            axis.append(row["strength"])
    return out


def robustness_json(checkpoints: Sequence[str | os.PathLike], **kwargs) -> dict:
    """:func:`robustness` grouped by :func:`rows_to_json` (JSON-serializable)."""
    return rows_to_json(robustness(checkpoints, **kwargs))


def format_table(rows: list[dict]) -> str:
    """Two plain-text tables (noise σ, FGSM ε): one line per checkpoint, accuracy in % per strength."""
    data = rows_to_json(rows)
    lines = [f"{data['dataset']} test set, {data['samples']} samples: accuracy (%)"]
    width = max([len(c["label"]) for c in data["checkpoints"]] + [10])
    for attack, title, symbol in (("noise", "Gaussian noise", "σ"), ("fgsm", "FGSM", "ε")):
        strengths = data["sigmas"] if attack == "noise" else data["epsilons"]
        lines.append("")
        lines.append(f"{title}".ljust(width) + "".join(f"{symbol}={s:g}".rjust(9) for s in strengths))
        for entry in data["checkpoints"]:
            lines.append(entry["label"].ljust(width) + "".join(f"{100 * a:9.2f}" for a in entry[attack]))
    return "\n".join(lines)


def plot_robustness(rows: list[dict], path: str | os.PathLike) -> Path:
    """Accuracy vs σ (left) and vs ε (right), one line per checkpoint, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows_to_json(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    try:
        for ax, attack, strengths, xlabel in (
            (axes[0], "noise", data["sigmas"], "Gaussian noise σ (input range [−1, 1])"),
            (axes[1], "fgsm", data["epsilons"], "FGSM ε (input range [−1, 1])"),
        ):
            for entry in data["checkpoints"]:
                ax.plot(strengths, entry[attack], "o-", label=entry["label"])
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.set_ylim(0, 1.02)
        axes[0].set_ylabel(f"test accuracy ({data['dataset']}, {data['samples']} samples)")
        axes[1].legend(fontsize="small", loc="best")
        fig.tight_layout()
        return save_png(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``robustness`` command's arguments (``onebit robustness``)."""
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoints (.pt) to compare")
    parser.add_argument("--dataset", "-d", help="dataset (default: the first checkpoint's)")
    parser.add_argument("--data-dir", help="folder holding the dataset files")
    parser.add_argument("--sigma", type=float, nargs="+", default=list(DEFAULT_SIGMAS),
                        help="Gaussian noise standard deviations, in the [-1, 1] input range")
    parser.add_argument("--epsilon", type=float, nargs="+", default=list(DEFAULT_EPSILONS),
                        help="FGSM step sizes, in the [-1, 1] input range")
    parser.add_argument("--limit", type=int, help="use the first N test samples only")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument("--label", action="append", help="legend label per checkpoint (repeat, in order)")
    parser.add_argument("--plot", help="write the accuracy curves to this PNG")
    parser.add_argument("--json", help="write the results to this JSON file")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the command for parsed ``args`` (see :func:`add_arguments`): print the table, write --plot/--json."""
    check_output_files(args.plot, args.json)
    rows = robustness(args.checkpoints, dataset=args.dataset, data_dir=args.data_dir, sigmas=args.sigma,
                      epsilons=args.epsilon, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                      labels=args.label)
    print(format_table(rows))
    if args.plot:
        plot_robustness(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump(rows_to_json(rows), handle, indent=2)
        print(f"json: {args.json}")
    return 0
