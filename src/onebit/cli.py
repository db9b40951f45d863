"""The ``onebit`` command line: argument parsing and printing; every command is a thin call into the API.

User errors (:class:`onebit.errors.OnebitError`) print one line, ``onebit: error: ...``, and exit 2.
Commands import their modules lazily so that ``onebit run`` works without torch.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_kwargs(pairs: list[tuple[str, object]] | None) -> dict:
    return dict(pairs or [])


# --------------------------------------------------------------------------- commands
def _without_nproc(argv: list[str]) -> list[str]:
    """The ``train`` arguments of ``argv`` minus ``--nproc N``: what each torchrun worker gets."""
    rest = argv[argv.index("train") + 1 :]
    kept, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        return launch(args.nproc, _without_nproc(args.argv))

    # options left unset are None, so that a recipe (or TrainConfig's defaults) supplies them
    settings = dict(
        dataset=args.dataset,
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
        augment=True if args.crop_padding else args.augment,
        crop_padding=args.crop_padding,
        val_fraction=args.val_fraction,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        device=args.device,
        sync_bn=args.sync_bn,
        amp=args.amp,
        flip=args.flip,
        cutout=args.cutout,
        compressed=args.compressed,
        recompute_bn=args.recompute_bn,
        teacher=args.teacher,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        scheduler_kwargs=dict(args.scheduler_arg) if args.scheduler_arg else None,
        optimizer_kwargs=dict(args.optimizer_arg) if args.optimizer_arg else None,
    )
    model_kwargs = _model_kwargs(args.model_arg)
    if args.recipe:
        from .recipes import recipe_config

        config = recipe_config(args.recipe, twin=args.float_twin, model=args.model,
                               model_kwargs=model_kwargs or None, **settings)
    else:
        if not args.model:
            raise OnebitError("give a model name (see `onebit models`) or --recipe NAME (see `onebit recipes`)")
        if args.float_twin:
            raise OnebitError("--float-twin needs --recipe")
        config = TrainConfig(model=args.model, model_kwargs=model_kwargs,
                             **{k: v for k, v in settings.items() if v is not None})
    args.model, args.dataset = config.model, config.dataset
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for the job
        return 130 if result.interrupted else 0
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


def _float_state_bytes(state: dict) -> int:
    return sum(t.numel() * 4 for t in state["model_state"].values() if t.is_floating_point())


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint, export_onnx
    from .train import load_checkpoint, model_from_checkpoint

    out = Path(args.output or Path(args.checkpoint).with_suffix(f".{args.format}"))
    _refuse_overwriting_input(out, args.checkpoint)
    state = load_checkpoint(args.checkpoint)
    if args.format == "onnx":
        export_onnx(model_from_checkpoint(state), out)
        print(f"{out}: ONNX graph of the float simulation of {state['model_name']}, {out.stat().st_size:,} bytes")
        return 0
    export_checkpoint(args.checkpoint, out)
    size, float_size = out.stat().st_size, _float_state_bytes(state)
    compared = (f"{float_size / size:.1f}x smaller than" if size <= float_size else
                f"{size / float_size:.2f}x the size of (a full-precision model)")
    print(f"{out}: {size:,} bytes, {compared} the float32 weights "
          f"({float_size:,} bytes); run it with `onebit run {out} --dataset DATASET`")
    return 0


def _refuse_overwriting_input(out: Path, source: str | os.PathLike) -> None:
    if out.exists() and out.resolve() == Path(source).resolve():
        raise OnebitError(f"the output {out} is the input file; give another --output")


def cmd_run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .engine import FormatError, kernels, load
    from .engine.executor import pixels_to_inputs

    if args.kernel:
        kernels.set_path(args.kernel)
    if (args.dataset is None) == (args.input is None):
        raise OnebitError("give either --dataset NAME (accuracy) or --input FILE.npy (predictions)")
    if args.output and args.dataset is not None:
        raise OnebitError("--output writes the logits of --input; with --dataset use --json for the figures")
    if args.output:
        _refuse_overwriting_input(Path(args.output), args.model_file)
        _refuse_overwriting_input(Path(args.output), args.input)
    try:
        model = load(args.model_file, threads=args.threads)
    except FormatError as exc:
        raise exc if args.model_file in str(exc) else FormatError(f"{args.model_file}: {exc}") from None
    if args.input is not None:
        try:
            x = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise OnebitError(f"cannot read {args.input} as a .npy array: {str(exc).splitlines()[0]}") from None
        logits = model.predict(x)
        if args.output:
            from .files import atomic_write

            with atomic_write(args.output) as handle:
                np.save(handle, logits)
            print(f"logits {logits.shape} written to {args.output}")
        else:
            print(" ".join(map(str, logits.argmax(axis=1))))
        return 0

    from .data import load_dataset

    data = load_dataset(args.dataset, args.split, data_dir=args.data_dir)
    if tuple(data.images.shape[1:]) != model.input_shape:
        raise OnebitError(f"dataset {args.dataset} has inputs {tuple(data.images.shape[1:])}, "
                          f"model expects {model.input_shape}")
    # pixels straight to the engine when the file knows this dataset's grid (the first layer then
    # runs exactly on them); otherwise the pipeline's float inputs
    on_pixels = model.input_levels == data.max_value
    correct, start = 0, time.perf_counter()
    for first in range(0, len(data.labels), args.batch_size):
        batch = slice(first, first + args.batch_size)
        images = data.images[batch]
        logits = model.predict_uint8(images) if on_pixels else model.predict(pixels_to_inputs(images, data.max_value))
        correct += int((logits.argmax(axis=1) == data.labels[batch]).sum())
    seconds = time.perf_counter() - start
    result = {"model": str(args.model_file), "dataset": args.dataset, "split": args.split,
              "samples": len(data.labels), "accuracy": correct / len(data.labels), "seconds": seconds,
              "samples_per_second": len(data.labels) / seconds, "kernel": kernels.current_path(),
              "input": "pixels" if on_pixels else "float"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model_file} on {args.dataset} ({args.split}, {result['samples']} samples): accuracy "
          f"{100 * result['accuracy']:.2f}%, {result['samples_per_second']:,.0f} samples/s "
          f"(kernel {result['kernel']}, batch {args.batch_size})")
    return 0


def _listing(registry) -> int:
    names = registry.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name.ljust(width)}  {registry.describe(name)}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import describe_recipe, list_recipes, recipe_text

    if args.name:
        print(recipe_text(args.name), end="")
        return 0
    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name.ljust(width)}  {describe_recipe(name)}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from .robustness import run_from_args

    return run_from_args(args)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_from_args

    return run_from_args(args)


def cmd_memory(args: argparse.Namespace) -> int:
    from .memory import format_memory_table, measure_memory

    rows = measure_memory(args.depth, args.width, args.batch, args.size, args.channels,
                          float_weights=args.float_weights, threads=args.threads, seed=args.seed,
                          rss=not args.no_rss, malloc_default=args.malloc_default)
    name = "float_wrn" if args.float_weights else "wrn_1bit"
    print(f"{name} WRN-{args.depth}-{args.width:g}, batch {args.batch}, input {args.channels}x{args.size}x{args.size}, "
          f"{args.threads} thread(s), random data")
    print(format_memory_table(rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_from_args

    return run_from_args(args)


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
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other user error of onebit (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onebit", description="Train and deploy binarized neural networks.")
    parser.add_argument("--version", action="version", version=f"onebit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-m", "--model-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="model constructor argument, e.g. -m hidden=1024 -m width=0.5 (repeatable)")

    train = commands.add_parser("train", help="train a model on a dataset, or a paper's recipe (--recipe)")
    train.add_argument("model", nargs="?", help="model name (see `onebit models`); with --recipe, replaces the recipe's")
    train.add_argument("--recipe", "-r", help="start from a published setting (see `onebit recipes`); options given override it")
    train.add_argument("--float-twin", action="store_true", help="with --recipe: train its full-precision baseline")
    train.add_argument("--dataset", "-d", help="dataset name (see `onebit datasets`); default digits")
    train.add_argument("--data-dir", help="folder holding the dataset files (default: $ONEBIT_DATA, system folders)")
    model_arg(train)
    train.add_argument("--epochs", type=int, help="default 10")
    train.add_argument("--batch-size", type=int, help="default 100")
    train.add_argument("--lr", type=float, help="initial learning rate (default 1e-3)")
    train.add_argument("--lr-end", type=float, help="final learning rate of the exponential schedule")
    train.add_argument("--optimizer", help="adam (default), sgd or bop")
    train.add_argument("--optimizer-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="optimizer option, e.g. --optimizer-arg momentum=0.95 for sgd, "
                            "--optimizer-arg threshold=1e-6 --optimizer-arg gamma=1e-3 for bop (repeatable)")
    train.add_argument("--lr-scaling", action="store_true", default=None,
                       help="BinaryNet's per-layer learning-rate scaling (1/Glorot range) for binary layers")
    train.add_argument("--weight-decay", type=float, help="default 0")
    train.add_argument("--scheduler", help="constant (default), exponential, cosine or sgdr")
    train.add_argument("--loss", help="cross_entropy (default) or square_hinge")
    train.add_argument("--scheduler-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="schedule argument, e.g. --scheduler-arg t0=2 for sgdr (repeatable)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random crop with padding (--no-augment turns a recipe's off)")
    train.add_argument("--crop-padding", type=int, metavar="PX",
                       help="random crop after padding by PX pixels (implies --augment; default 4, 1 for digits)")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips (--no-flip turns a recipe's off)")
    train.add_argument("--cutout", type=int, help="cutout square size in pixels (default 0: none)")
    train.add_argument("--recompute-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="after the last epoch, set the batch norms' statistics from the whole training set "
                            "(McDonnell 2018); --no-recompute-bn turns a recipe's off")
    train.add_argument("--compressed", choices=["mean", "stochastic", "rounded"],  # onebit.memory.CODES, without importing torch
                       help="compressed learning: keep 1 (mean), 2 (stochastic) or 3 (rounded) bits per "
                            "activation for the backward pass (onebit.memory)")
    train.add_argument("--teacher", metavar="CHECKPOINT",
                       help="distill from this trained network's outputs (onebit.distill)")
    train.add_argument("--distill-weight", type=float, metavar="W",
                       help="with --teacher: loss = (1 - W) task loss + W distillation loss (default 0.5)")
    train.add_argument("--distill-temperature", type=float, metavar="T",
                       help="with --teacher: softmax temperature of the distillation loss (default 4)")
    train.add_argument("--val-fraction", type=float, help="share of the training set held out (default 0.1)")
    train.add_argument("--seed", type=int, help="default 0")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    train.add_argument("--out", "-o", help="output folder for checkpoints and metrics (default runs/onebit, runs/RECIPE)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in OUT even if it holds an unfinished run (which is refused otherwise)")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-epoch lines")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda if available")
    train.add_argument("--amp", action="store_true", default=None,
                       help="bfloat16 autocast on CUDA (latent weights stay float32)")
    train.add_argument("--nproc", type=_positive_int,
                       help="data-parallel processes on this machine (runs torchrun; batch size is per process)")
    train.add_argument("--sync-bn", action="store_true", default=None,
                       help="with several processes: batch norm over the global batch")
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

    export = commands.add_parser("export", help="write a checkpoint as a bit-packed .onebit file (or ONNX)")
    export.add_argument("checkpoint", help="a checkpoint written by `onebit train` (best.pt, last.pt)")
    export.add_argument("--output", "-o", help="output file (default: the checkpoint's name with .onebit/.onnx)")
    export.add_argument("--format", "-f", choices=["onebit", "onnx"], default="onebit",
                        help="onebit: the engine's file (default); onnx: the float simulation, standard ops")
    export.set_defaults(func=cmd_export)

    run = commands.add_parser("run", help="run a .onebit file with the native engine (accuracy or predictions)")
    run.add_argument("model_file", help="a file written by `onebit export`")
    run.add_argument("--dataset", "-d", help="measure accuracy on this dataset (see `onebit datasets`)")
    run.add_argument("--data-dir")
    run.add_argument("--split", default="test", choices=["train", "test"])
    run.add_argument("--input", "-i", help="a .npy float32 array [N, *input_shape] to classify instead")
    run.add_argument("--output", "-o", help="with --input: write the logits here (.npy) instead of printing labels")
    run.add_argument("--batch-size", type=_positive_int, default=1000)
    run.add_argument("--threads", type=_positive_int, help="threads per kernel call (default: all cores)")
    run.add_argument("--kernel", help="kernel path: avx512, avx2, portable or numpy (default: fastest available)")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)

    recipes = commands.add_parser("recipes", help="list the training recipes, or print one with its sources")
    recipes.add_argument("name", nargs="?", help="recipe to print")
    recipes.set_defaults(func=cmd_recipes)

    from .robustness import add_arguments as robustness_arguments

    robustness = commands.add_parser("robustness", help="accuracy of checkpoints under input noise and FGSM")
    robustness_arguments(robustness).set_defaults(func=cmd_robustness)

    from .report import add_arguments as report_arguments

    report = commands.add_parser("report", help="markdown results table and curves from run folders")
    report_arguments(report).set_defaults(func=cmd_report)

    from .bench import add_arguments as bench_arguments

    bench = commands.add_parser("bench", help="engine vs PyTorch float32: GEMM, conv, end to end, file sizes")
    bench_arguments(bench).set_defaults(func=cmd_bench)

    memory = commands.add_parser("memory", help="saved-for-backward and peak memory of WRN training, compressed or not")
    memory.add_argument("--depth", type=int, default=20, help="WRN depth, 6n + 2 (default 20)")
    memory.add_argument("--width", type=float, default=4, help="WRN width k (default 4)")
    memory.add_argument("--batch", type=_positive_int, default=128, help="batch size (default 128)")
    memory.add_argument("--size", type=_positive_int, default=32, help="input height and width (default 32)")
    memory.add_argument("--channels", type=_positive_int, default=3, help="input channels (default 3)")
    memory.add_argument("--float-weights", action="store_true", help="float_wrn instead of wrn_1bit")
    memory.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    memory.add_argument("--seed", type=int, default=0)
    memory.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    memory.add_argument("--malloc-default", action="store_true",
                        help="measure RSS with glibc's default malloc settings (see onebit.memory.measure_memory)")
    memory.set_defaults(func=cmd_memory)

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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except OnebitError as exc:
        print(f"onebit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onebit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
