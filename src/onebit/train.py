"""The training loop: latent-weight training of quantized networks, with checkpoints that resume exactly.

Typical use::

    from onebit.train import TrainConfig, train
    result = train(TrainConfig(model="binarynet_mlp", dataset="digits", epochs=20,
                               model_kwargs={"hidden": 512}, out="runs/digits"))
    print(result.test["accuracy"])

Each epoch writes ``last.pt`` (and ``best.pt`` when validation improves) atomically into
``out``; ``TrainConfig(resume=True)`` continues from ``last.pt`` so that 2 epochs straight and
1 + 1 resumed give identical weights and metrics. A fresh run into a folder that holds an
unfinished one (its ``last.pt`` short of its epochs) is refused unless ``overwrite=True``.
Batches depend only on (seed, epoch), and the torch RNG states (dropout, stochastic
binarization; CPU and CUDA) are stored in the checkpoint.
Ctrl-C saves the state reached mid-epoch, including how many batches of the epoch were done and
their loss and accuracy sums, and resuming skips them. A resumed run must keep every setting
that changes what it computes (:func:`experiment_settings`) except ``epochs``, which may grow.

Under ``torchrun`` (see :mod:`onebit.distributed`) the same function trains data-parallel:
``batch_size`` per process, gradients averaged by DDP, optional global batch norm
(``sync_bn``), files and output from rank 0 only. A checkpoint resumes with any number of
processes; resuming mid-epoch with a different number skips the same number of samples
(not the same samples). With several processes the dropout/stochastic-sign random stream is
reseeded from (seed, epoch, rank) at each epoch start, so exact resumption holds at epoch ends.

Metrics go to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard events in ``out``; the settings
to ``config.json`` and the final test figures to ``result.json``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .data import Augment, BatchLoader, DATASETS, load_dataset, split_validation
from .distributed import DistContext, setup, sync_batch_norm
from .errors import CheckpointError, OnebitError
from .files import atomic_write, zip_integrity_error
from .layers import clip_latent_weights, has_stochastic_quantizer, recompute_batchnorm
from .losses import distillation_loss, get_loss
from .memory import peak_rss
from .memory import compressed_activations
from .models import create_model
from .optim import build_optimizer, build_scheduler

CHECKPOINT_FORMAT = "onebit-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint."""

    model: str = "binarynet_mlp"
    dataset: str = "digits"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    lr_end: float | None = None
    optimizer: str = "adam"
    lr_scaling: bool = False
    weight_decay: float = 0.0
    scheduler: str = "constant"
    loss: str = "cross_entropy"
    augment: bool = False
    crop_padding: int | None = None  # random-crop padding when augment is on; None: 4 px (1 px for 8x8 digits)
    val_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None
    out: str = "runs/onebit"
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace an unfinished one in ``out``
    progress: bool = True
    device: str = "auto"
    sync_bn: bool = False
    amp: bool = False
    recipe: str | None = None  # the recipe (onebit.recipes) these settings started from, for the record
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. SGD's momentum, Bop's threshold
    flip: bool = False
    cutout: int = 0
    compressed: str | None = None  # an activation code of onebit.memory.CODES: compressed learning
    teacher: str | None = None  # checkpoint of a trained network to distill from, see onebit.distill
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    recompute_bn: bool = False  # after the last epoch, set BN running statistics from the whole training set

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise OnebitError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OnebitError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OnebitError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise OnebitError(f"crop padding must be >= 0 pixels, got {self.crop_padding}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OnebitError(f"learning rate must be a positive number, got {self.lr}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise OnebitError(f"distillation weight must be in [0, 1], got {self.distill_weight}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise OnebitError(f"distillation temperature must be a positive number, got {self.distill_temperature}")
        if self.lr_end is not None and not (math.isfinite(self.lr_end) and self.lr_end >= 0):
            raise OnebitError(f"final learning rate must be a number ≥ 0, got {self.lr_end}")
        if self.threads is not None and self.threads < 1:
            raise OnebitError(f"threads must be at least 1 (leave it out for all cores), got {self.threads}")
        if not 0 <= self.seed < 2**63:
            raise OnebitError(f"seed must be in 0 .. 2^63 - 1, got {self.seed}")
        if {"in_shape", "num_classes"} & set(self.model_kwargs):
            raise OnebitError("in_shape and num_classes come from the dataset; do not pass them as model arguments")
        if self.resume and self.overwrite:
            raise OnebitError("resume continues the run in the output folder and overwrite replaces it: give one")
        if self.amp and self.device == "cpu":
            raise OnebitError("mixed precision (amp) is for CUDA devices; drop --amp or use --device cuda")


@dataclass
class TrainResult:
    out: Path
    epochs_run: int
    history: list[dict]
    test: dict
    seconds: float
    interrupted: bool = False


#: settings that do not change what a run computes: runs differing only in these are repeats
NOT_THE_EXPERIMENT = ("seed", "out", "resume", "overwrite", "progress", "threads", "data_dir", "device")

#: experiment settings a resumed run may change: more epochs extend the run, recompute_bn acts
#: after the last epoch, and the recipe name is a label
_MAY_CHANGE_ON_RESUME = ("epochs", "recompute_bn", "recipe")


def config_defaults() -> dict[str, Any]:
    """Every TrainConfig field's default value."""
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig)}


def experiment_settings(config: dict) -> dict[str, Any]:
    """The settings that define what a run computes: ``config`` (a TrainConfig as a dict, maybe
    from an older version) over the defaults, minus :data:`NOT_THE_EXPERIMENT` and the settings
    that others make moot (the crop padding without augmentation, distillation without a teacher)."""
    settings = {**config_defaults(), **config}
    moot = set(NOT_THE_EXPERIMENT)
    if not settings.get("augment"):
        moot.add("crop_padding")
    if not settings.get("teacher"):
        moot |= {"distill_weight", "distill_temperature"}
    return {k: v for k, v in settings.items() if k not in moot}


def _unfinished_run(path: Path) -> str | None:
    """How far the run whose ``last.pt`` is ``path`` got, if it stopped before its last epoch."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError:  # nothing a resume could continue
        return None
    epoch, epochs = state.get("epoch"), state["config"].get("epochs")
    if not (isinstance(epoch, int) and isinstance(epochs, int)):
        return None
    if state.get("batches_done"):  # saved by Ctrl-C in the middle of an epoch
        return f"stopped in epoch {epoch + 1} of {epochs}"
    return f"{epoch} of {epochs} epochs done" if epoch < epochs else None


def _check_resumable(saved_config: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume ``path`` under settings that would compute something else."""
    saved = {**experiment_settings(saved_config), "seed": saved_config.get("seed")}
    now = {**experiment_settings(dataclasses.asdict(config)), "seed": config.seed}
    # in the fields' order, so that a changed teacher is named rather than its moot temperature
    for key in (f.name for f in dataclasses.fields(TrainConfig)):
        if key in _MAY_CHANGE_ON_RESUME:
            continue
        if saved.get(key) != now.get(key):
            raise CheckpointError(f"cannot resume: {key} was {saved.get(key)!r} in {path}, now {now.get(key)!r} "
                                  "(resume with the run's own settings, or start a new run)")


def model_kwargs_for(config: TrainConfig) -> dict[str, Any]:
    """The model's constructor arguments: the dataset fixes input shape and class count."""
    info = DATASETS.get(config.dataset).info
    return {"in_shape": tuple(info["input_shape"]), "num_classes": info["num_classes"], **config.model_kwargs}


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`train`, refusing anything but plain tensors and containers."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file such as {path / 'best.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    problem = zip_integrity_error(path)  # torch.load does not check the zip CRCs
    if problem is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or hostile file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an onebit checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this onebit reads version {CHECKPOINT_VERSION}"
        )
    for key, kind in (("model_name", str), ("model_kwargs", dict), ("model_state", dict), ("config", dict)):
        if not isinstance(state.get(key), kind):
            found = "nothing" if key not in state else type(state[key]).__name__
            raise CheckpointError(f"checkpoint {path}: {key!r} must be a {kind.__name__}, found {found}")
    in_shape = state["model_kwargs"].get("in_shape")
    if in_shape is not None and not (isinstance(in_shape, (list, tuple)) and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in in_shape)):
        raise CheckpointError(f"checkpoint {path}: in_shape must be a list of positive sizes, found {in_shape!r}"[:300])
    return state


def model_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    kwargs = dict(state["model_kwargs"])
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
    model = create_model(state["model_name"], **kwargs)
    try:
        model.load_state_dict(state["model_state"])
    except (RuntimeError, KeyError, TypeError) as exc:
        # torch's first line is only "Error(s) in loading state_dict for ...": the reasons follow it
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = " ".join(lines[1:2] or lines[:1])
        raise CheckpointError(f"checkpoint weights do not fit model {state['model_name']}: {reason[:200]}") from None
    return model.eval()


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout :func:`train` gives ``model``'s weights on ``device``: NHWC (``channels_last``) for
    a network with convolutions on a CPU, where oneDNN's convolutions run faster in it (a training
    step 1.12-1.18x for WRN-8-4, 1.08-1.13x for binarynet_cnn, benchmarks/train_step.py); else as built."""
    if device.type == "cpu" and any(isinstance(module, nn.Conv2d) for module in model.modules()):
        return torch.channels_last
    return torch.contiguous_format


def _best_epoch(history: list[dict]) -> int:
    """The epoch whose weights ``best.pt`` holds: the first with the highest score."""
    scores = [row.get("val_accuracy", row["train_accuracy"]) for row in history]
    return scores.index(max(scores)) + 1


# --------------------------------------------------------------------------- metrics
class MetricsLog:
    """Per-epoch metrics as JSON lines, CSV and TensorBoard scalars."""

    def __init__(self, out: Path, resumed_history: list[dict] | None) -> None:
        """``resumed_history``: the epochs in the checkpoint a resumed run continues (None: a fresh run)."""
        self.jsonl = out / "metrics.jsonl"
        self.csv = out / "metrics.csv"
        events = out / "tensorboard"
        if resumed_history is None:
            for path in (self.jsonl, self.csv, *events.glob("events.out.tfevents.*")):
                path.unlink(missing_ok=True)
        else:
            # the checkpoint is the record: the files may hold rows of epochs it redoes (a kill
            # between a row and its checkpoint), a row cut by a kill, or be gone
            self._rewrite(resumed_history)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the earlier files' events from the first epoch redone on
        self.tensorboard = SummaryWriter(
            log_dir=str(events), purge_step=None if resumed_history is None else len(resumed_history) + 1)

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_write(self.jsonl, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        if not rows:
            self.csv.unlink(missing_ok=True)
            return
        with atomic_write(self.csv, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        new_csv = not self.csv.exists()
        with self.csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new_csv:
                writer.writeheader()
            writer.writerow(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["epoch"])
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, num_classes: int) -> dict:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    total_loss, count = 0.0, 0
    device = next(model.parameters()).device
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(loss_fn(logits, y)) * len(y)
        count += len(y)
        confusion += torch.bincount((y * num_classes + logits.argmax(1)).cpu(), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    if count == 0:
        raise OnebitError("evaluation set is empty")
    accuracy = float(confusion.diagonal().sum()) / count
    return {"loss": total_loss / count, "accuracy": accuracy, "confusion": confusion.tolist()}


# --------------------------------------------------------------------------- training
class _InterruptFlag:
    """Turns the first Ctrl-C into a flag checked between batches, so the state saved is consistent."""

    def __init__(self) -> None:
        self.raised = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C means "stop now"
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _last_good(out: Path) -> str:
    last = out / "last.pt"
    return f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was saved yet"


def _check_finite_weights(model: nn.Module, epoch: int, out: Path) -> None:
    # buffers too: BatchNorm's running statistics become the exported thresholds
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise OnebitError(f"weights became NaN/Inf at epoch {epoch} ({bad[0]}); {_last_good(out)}")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; see the module docstring."""
    context = setup(config.device)
    try:
        result = _train(config, context)
    except BaseException:
        context.close(wait_for_others=False)
        raise
    context.close()
    return result


def _train(config: TrainConfig, context: DistContext) -> TrainResult:
    out = Path(config.out)
    main = context.is_main
    if config.threads:
        torch.set_num_threads(config.threads)
    device = context.device

    resume_state = load_checkpoint(out / "last.pt") if config.resume else None
    if resume_state is not None:
        _check_resumable(dict(resume_state["config"]), config, out / "last.pt")
    elif not config.overwrite and (reached := _unfinished_run(out / "last.pt")):
        # a fresh run would wipe its metrics and then its checkpoints: hours of training
        raise OnebitError(f"{out} holds an unfinished run ({reached}): continue it with --resume, "
                          "or start afresh there with --overwrite")

    torch.manual_seed(config.seed)
    # the model before the data: a bad model argument is reported without waiting for a download
    model_kwargs = model_kwargs_for(config)
    model = create_model(config.model, **model_kwargs)
    full_train = load_dataset(config.dataset, "train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, "test", data_dir=config.data_dir)
    train_set, val_set = split_validation(full_train, config.val_fraction, seed=config.seed)

    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
    if config.sync_bn and context.distributed:
        model = sync_batch_norm(model, device)
    model.to(device)
    # before DDP, whose gradient buckets copy the layout; the inputs follow the weights' layout
    model.to(memory_format=training_memory_format(model, device))
    # DDP averages gradients; the optimizer, the clipping and Bop then act on identical
    # values on every rank, which the per-epoch checksum below verifies
    trained = nn.parallel.DistributedDataParallel(model) if context.distributed else model
    num_classes = model_kwargs["num_classes"]
    loss_fn = get_loss(config.loss)
    optimizer = build_optimizer(
        model, config.optimizer, config.lr, weight_decay=config.weight_decay, lr_scaling=config.lr_scaling,
        **config.optimizer_kwargs,
    )
    default_padding = 4 if full_train.images.shape[-1] >= 28 else 1
    crop = (default_padding if config.crop_padding is None else config.crop_padding) if config.augment else 0
    augment = Augment(crop_padding=crop, flip=config.flip, cutout=config.cutout) if crop or config.flip or config.cutout else None
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, seed=config.seed, augment=augment,
                               rank=context.rank, world_size=context.world_size)
    teacher = None
    if config.teacher:
        from .distill import Teacher

        teacher = Teacher(config.teacher, model_kwargs["in_shape"], num_classes, device)
        if augment is None:
            teacher.remember(train_set, progress=config.progress and main)
    eval_batch = max(config.batch_size, 256)
    val_loader = BatchLoader(val_set, eval_batch) if len(val_set) else None
    test_loader = BatchLoader(test_set, eval_batch)
    scheduler = build_scheduler(
        optimizer, config.scheduler, epochs=config.epochs, steps_per_epoch=len(train_loader), lr_end=config.lr_end,
        **config.scheduler_kwargs,
    )
    # the folder is made only now, so that a bad setting above leaves nothing behind
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # an existing file of that name, a read-only or missing parent
            raise OnebitError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
        for stale in out.glob(".*.tmp"):  # temporary files of writes a kill interrupted
            stale.unlink(missing_ok=True)

    # a stochastic quantizer's eval form is deterministic: its batch norms need their own statistics
    stochastic = has_stochastic_quantizer(model)

    def training_images():
        return (x.to(device) for x, _ in BatchLoader(train_set, eval_batch))

    start_epoch, skip_batches, history, best = 0, 0, [], -1.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer_state"])
        scheduler.load_state_dict(resume_state["scheduler_state"])
        torch.set_rng_state(resume_state["rng_state"])
        if device.type == "cuda" and "cuda_rng_state" in resume_state:
            torch.cuda.set_rng_state(resume_state["cuda_rng_state"], device)
        start_epoch = resume_state["epoch"]
        # a checkpoint counts batches of its own world size; keep the number of samples seen
        skip_batches = resume_state["batches_done"] * resume_state.get("world_size", 1) // context.world_size
        scheduler.batch = skip_batches
        history = list(resume_state["history"])
        best = resume_state["best_accuracy"]
    # the loss and accuracy sums of an epoch a Ctrl-C cut short, so that its metrics row covers all of it
    partial = dict(resume_state.get("partial_epoch") or {}) if skip_batches else {}

    def state(epoch: int, batches_done: int, partial_epoch: dict | None = None) -> dict:
        saved = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "onebit_version": __version__,
            "model_name": config.model,
            "model_kwargs": {**model_kwargs, "in_shape": list(model_kwargs["in_shape"])},
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "rng_state": torch.get_rng_state(),
            "epoch": epoch,
            "batches_done": batches_done,
            "world_size": context.world_size,
            "history": history,
            "best_accuracy": best,
            "config": dataclasses.asdict(config),
        }
        if partial_epoch is not None:
            saved["partial_epoch"] = partial_epoch
        if device.type == "cuda":  # dropout and stochastic binarization draw from the device's generator
            saved["cuda_rng_state"] = torch.cuda.get_rng_state(device)
        return saved

    if main:  # the run's settings in plain JSON, for onebit.report and for people
        with atomic_write(out / "config.json", "w") as handle:
            json.dump(dataclasses.asdict(config), handle, indent=2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    progress = config.progress and main
    log = MetricsLog(out, history if resume_state is not None else None) if main else None
    started = time.perf_counter()
    interrupted = False
    compression = compressed_activations(model, code=config.compressed) if config.compressed else contextlib.nullcontext()
    try:
        with _InterruptFlag() as interrupt, compression:
            for epoch in range(start_epoch, config.epochs):
                epoch_start = time.perf_counter()
                model.train()
                train_loader.set_epoch(epoch)
                if context.distributed:
                    torch.manual_seed(_epoch_seed(config.seed, epoch, context.rank))
                running_loss, correct, seen = partial.get("loss", 0.0), partial.get("correct", 0), partial.get("seen", 0)
                partial = {}
                bar = _progress(train_loader.indexed(), len(train_loader), f"epoch {epoch + 1}/{config.epochs}", progress)
                for batch_index, (indices, x, y) in enumerate(bar):
                    if batch_index < skip_batches:
                        continue
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        logits = trained(x)
                        loss = loss_fn(logits.float(), y)
                        if teacher is not None:
                            soft = distillation_loss(logits.float(), teacher.logits(x, indices), config.distill_temperature)
                            loss = (1 - config.distill_weight) * loss + config.distill_weight * soft
                    if not torch.isfinite(loss):
                        raise OnebitError(
                            f"loss became {float(loss.detach())} at epoch {epoch + 1}, batch {batch_index + 1}; "
                            f"{_last_good(out)}"
                        )
                    loss.backward()
                    optimizer.step()
                    clip_latent_weights(model)
                    scheduler.step_batch()
                    running_loss += float(loss.detach()) * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                    bar.set_postfix(loss=f"{running_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
                    # every rank must stop after the same batch, or the next all-reduce hangs
                    if context.any_true(interrupt.raised):
                        if main:
                            save_checkpoint(out / "last.pt", state(epoch, batch_index + 1,
                                                                   {"loss": running_loss, "correct": correct, "seen": seen}))
                        interrupted = True
                        break
                bar.close()
                if interrupted:
                    break
                skip_batches = 0
                scheduler.step_epoch()
                _check_finite_weights(model, epoch + 1, out)
                if not context.same_on_all_ranks(model):
                    raise OnebitError(f"the processes' weights diverged at epoch {epoch + 1}; "
                                      f"{_last_good(out)}")
                row = {
                    "epoch": epoch + 1,
                    "train_loss": running_loss / max(seen, 1),
                    "train_accuracy": correct / max(seen, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - epoch_start,
                }
                if stochastic:
                    recompute_batchnorm(model, training_images())
                if val_loader is not None:
                    val = evaluate(model, val_loader, loss_fn, num_classes)
                    row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                score = row.get("val_accuracy", row["train_accuracy"])
                history.append(row)
                if main:
                    log.write(row)
                    if progress:
                        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                        print(shown, flush=True)
                if score > best:
                    best = score
                    if main:
                        save_checkpoint(out / "best.pt", state(epoch + 1, 0))
                if main:
                    save_checkpoint(out / "last.pt", state(epoch + 1, 0))
    finally:
        if log is not None:
            log.close()

    # a stochastic network's statistics were already recomputed after its last epoch
    if config.recompute_bn and not stochastic and not interrupted and len(history) == config.epochs:
        if progress:
            print(f"recomputing batch-norm statistics over the {len(train_set)} training images", flush=True)
        # running averages mix statistics of weights that kept changing; these are the finished
        # network's own (McDonnell 2018, Section 3.2.1: "a small benefit")
        recompute_batchnorm(model, training_images())
        if main:
            save_checkpoint(out / "last.pt", state(config.epochs, 0))
            if _best_epoch(history) == config.epochs:  # best.pt holds these weights too
                save_checkpoint(out / "best.pt", state(config.epochs, 0))

    test = evaluate(model, test_loader, loss_fn, num_classes)
    result = TrainResult(
        out=out,
        epochs_run=len(history),
        history=history,
        test=test,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
    )
    if main:
        with atomic_write(out / "result.json", "w") as handle:
            json.dump(
                {
                    "model": config.model,
                    "dataset": config.dataset,
                    "epochs": result.epochs_run,
                    "seconds": result.seconds,
                    "test_accuracy": test["accuracy"],
                    "test_loss": test["loss"],
                    "interrupted": interrupted,
                    "processes": context.world_size,
                    # the whole process's high-water mark: data, model, optimizer state and activations
                    "peak_rss_mib": peak_rss() / 2**20,
                },
                handle,
                indent=2,
            )
    return result
