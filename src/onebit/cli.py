"""The ``onebit`` command line: argument parsing and printing; every command is a thin call into the API.

User errors (:class:`onebit.errors.OnebitError`) print one line, ``onebit: error: ...``, and exit 2.
Commands import their modules lazily so that ``onebit run`` works without torch.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from . import __version__
from .errors import OnebitError


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def _model_kwargs(pairs: list[tuple[str, object]] | None) -> dict:
    return dict(pairs or [])


# --------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        model_kwargs=_model_kwargs(args.model_arg),
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_end=args.lr_end,
        optimizer=args.optimizer,
        lr_scaling=args.lr_scaling,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        loss=args.loss,
        augment=args.augment,
        val_fraction=args.val_fraction,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        resume=args.resume,
        progress=not args.quiet,
    )
    result = train(config)
    if result.interrupted:
        print(f"interrupted: state saved to {result.out / 'last.pt'}; continue with the same command plus --resume")
        return 130
    print(
        f"{args.model} on {args.dataset}: test accuracy {100 * result.test['accuracy']:.2f}% "
        f"(loss {result.test['loss']:.4f}) after {result.epochs_run} epochs in {result.seconds:.1f} s; "
        f"checkpoints in {result.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import BatchLoader, load_dataset
    from .losses import get_loss
    from .train import evaluate, load_checkpoint, model_from_checkpoint

    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state)
    config = state["config"]
    dataset = args.dataset or config["dataset"]
    data = load_dataset(dataset, args.split, data_dir=args.data_dir or config.get("data_dir"))
    expected = tuple(state["model_kwargs"]["in_shape"])
    if tuple(data.images.shape[1:]) != expected:
        raise OnebitError(f"dataset {dataset} has inputs {tuple(data.images.shape[1:])}, model expects {expected}")
    num_classes = state["model_kwargs"]["num_classes"]
    metrics = evaluate(model, BatchLoader(data, args.batch_size), get_loss(config["loss"]), num_classes)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{state['model_name']} on {dataset} ({args.split}, {len(data.labels)} samples): "
          f"accuracy {100 * metrics['accuracy']:.2f}%, loss {metrics['loss']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    width = max(len(str(v)) for row in metrics["confusion"] for v in row)
    for row in metrics["confusion"]:
        print("  " + " ".join(str(v).rjust(width) for v in row))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .models import create_model
    from .summary import summarize

    kwargs = _model_kwargs(args.model_arg)
    if args.dataset:
        info = DATASETS.get(args.dataset).info
        kwargs = {"in_shape": tuple(info["input_shape"]), "num_classes": info["num_classes"], **kwargs}
    summary = summarize(create_model(args.model, **kwargs))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.table())
    return 0


def _listing(registry) -> int:
    names = registry.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name.ljust(width)}  {registry.describe(name)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS

    return _listing(MODELS)


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import DATASETS

    return _listing(DATASETS)


def cmd_quantizers(args: argparse.Namespace) -> int:
    from .quantizers import QUANTIZERS

    return _listing(QUANTIZERS)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onebit", description="Train and deploy binarized neural networks.")
    parser.add_argument("--version", action="version", version=f"onebit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-m", "--model-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="model constructor argument, e.g. -m hidden=1024 -m width=0.5 (repeatable)")

    train = commands.add_parser("train", help="train a model on a dataset")
    train.add_argument("model", help="model name (see `onebit models`)")
    train.add_argument("--dataset", "-d", default="digits", help="dataset name (see `onebit datasets`); default digits")
    train.add_argument("--data-dir", help="folder holding the dataset files (default: $ONEBIT_DATA, system folders)")
    model_arg(train)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    train.add_argument("--lr-end", type=float, help="final learning rate of the exponential schedule")
    train.add_argument("--optimizer", default="adam", help="adam, sgd or bop")
    train.add_argument("--lr-scaling", action="store_true",
                       help="BinaryNet's per-layer learning-rate scaling (1/Glorot range) for binary layers")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--scheduler", default="constant", help="constant, exponential, cosine or sgdr")
    train.add_argument("--loss", default="cross_entropy", help="cross_entropy or square_hinge")
    train.add_argument("--augment", action="store_true", help="random crop with padding")
    train.add_argument("--val-fraction", type=float, default=0.1, help="share of the training set held out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    train.add_argument("--out", "-o", default="runs/onebit", help="output folder for checkpoints and metrics")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-epoch lines")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="accuracy, loss and confusion matrix of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--dataset", "-d", help="dataset (default: the one it was trained on)")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    summary = commands.add_parser("summary", help="per-layer bits, memory and MACs of a model")
    summary.add_argument("model")
    model_arg(summary)
    summary.add_argument("--dataset", "-d", help="take input shape and class count from this dataset")
    summary.add_argument("--json", action="store_true")
    summary.set_defaults(func=cmd_summary)

    for name, func, what in (
        ("models", cmd_models, "list the models"),
        ("datasets", cmd_datasets, "list the datasets"),
        ("quantizers", cmd_quantizers, "list the quantizers"),
    ):
        commands.add_parser(name, help=what).set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OnebitError as exc:
        print(f"onebit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onebit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
