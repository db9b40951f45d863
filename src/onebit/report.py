"""The results page: a markdown report generated from training-run folders.

    onebit report runs/ -o docs/results.md                # or build_report(["runs"], "docs/results.md")

Every folder under the given ones that holds a ``result.json`` (written by
:func:`onebit.train.train`) is a run. For each run the report reads ``result.json`` (test
accuracy, wall time, epochs), ``metrics.jsonl`` (per-epoch train/val accuracy) and the
training configuration — from ``config.json`` if the folder has one, else from the
``"config"`` entry of ``last.pt`` (or ``best.pt``), loaded with ``weights_only=True``.

It writes, through :func:`onebit.files.atomic_write`:

* a markdown file with one table row per run — recipe/model, dataset, epochs, wall time,
  test error, the error of its float twin and the gap — followed by the exact
  ``onebit train`` command that reproduces each row, and a table of published results next
  to ours where a run matches the paper's setting;
* one PNG per dataset (``<figures>/curves_<dataset>.png``, default folder ``figures/``
  beside the markdown) with train and validation accuracy per epoch for every run.

A binary run's *float twin* is a run on the same dataset whose model is the recipe's
``float_twin`` (else ``float_mlp`` / ``float_cnn`` by name) and whose layers have the same
shapes (same width, depth, channels), preferring one with the same number of epochs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import OnebitError
from .files import atomic_write, check_output_files, save_png

__all__ = [
    "PAPER_RESULTS",
    "Run",
    "add_arguments",
    "build_report",
    "curve_panels",
    "find_runs",
    "load_run",
    "plot_curves",
    "render_markdown",
    "seed_groups",
    "run_from_args",
    "train_command",
]

#: Published test errors (%) compared with ours where a run matches ``model``/``dataset``/``loss``
#: and uses the model's own quantizers (no ``*_quantizer`` override in its model arguments).
PAPER_RESULTS: list[dict[str, Any]] = [
    {"setting": "BinaryNet MLP 3×4096, MNIST", "model": "binarynet_mlp", "dataset": "mnist", "loss": None,
     "error": 0.96, "source": "Courbariaux et al. 2016 (arXiv:1602.02830), Table 1, Theano"},
    {"setting": "BinaryNet ConvNet, CIFAR-10", "model": "binarynet_cnn", "dataset": "cifar10", "loss": None,
     "error": 11.40, "source": "Courbariaux et al. 2016 (arXiv:1602.02830), Table 1, Theano"},
    {"setting": "BinaryNet ConvNet, SVHN", "model": "binarynet_cnn", "dataset": "svhn", "loss": None,
     "error": 2.80, "source": "Courbariaux et al. 2016 (arXiv:1602.02830), Table 1, Theano"},
    {"setting": "BinaryNet MLP, MNIST, square hinge loss", "model": "binarynet_mlp", "dataset": "mnist",
     "loss": "square_hinge", "error": 1.06, "source": "as quoted in onebit issue 5; primary source not verified"},
    {"setting": "BinaryNet MLP, MNIST, cross-entropy loss", "model": "binarynet_mlp", "dataset": "mnist",
     "loss": "cross_entropy", "error": 1.02, "source": "as quoted in onebit issue 5; primary source not verified"},
]

_QUANTIZER_OVERRIDES = ("weight_quantizer", "input_quantizer", "weight_quantizer_args", "input_quantizer_args")


# --------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    """One training-run folder, as read by :func:`load_run`."""

    path: Path
    result: dict
    config: dict
    history: list[dict]
    model_kwargs: dict  # what the model was built with (checkpoint), else the config's
    recipe: str | None = None
    twin: "Run | None" = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        return str(self.config.get("model") or self.result.get("model"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset") or self.result.get("dataset"))

    @property
    def epochs(self) -> int:
        return int(self.result.get("epochs") or len(self.history))

    @property
    def error(self) -> float | None:
        """Test error in percent."""
        acc = self.result.get("test_accuracy")
        return None if acc is None else 100.0 * (1.0 - float(acc))

    @property
    def seconds(self) -> float | None:
        """Wall time: result.json's seconds, or the sum of the per-epoch seconds of metrics.jsonl when
        that is larger (a resumed run's result.json counts only its last session)."""
        per_epoch = sum(float(row.get("seconds", 0.0)) for row in self.history)
        total = self.result.get("seconds")
        if total is None:
            return per_epoch or None
        return max(float(total), per_epoch)

    @property
    def is_float(self) -> bool:
        return self.model.startswith("float_")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnebitError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None


def _read_history(path: Path) -> list[dict]:
    """metrics.jsonl rows, one per epoch (the last row wins for a repeated epoch)."""
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of an interrupted write
        if isinstance(row, dict) and "epoch" in row:
            rows[int(row["epoch"])] = row
    return [rows[k] for k in sorted(rows)]


def _read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(config, model_kwargs) from config.json or the folder's checkpoint; ({}, {}) when neither exists."""
    config: dict = {}
    if (folder / "config.json").is_file():
        config = dict(_read_json(folder / "config.json"))
    for name in ("last.pt", "best.pt"):
        if (folder / name).is_file():
            from .train import load_checkpoint

            state = load_checkpoint(folder / name)
            return (config or dict(state["config"])), dict(state.get("model_kwargs") or {})
    return config, dict(config.get("model_kwargs") or {})


def load_run(folder: str | os.PathLike) -> Run:
    """Read one run folder (it must hold ``result.json``)."""
    folder = Path(folder)
    result = _read_json(folder / "result.json")
    if not isinstance(result, dict):
        raise OnebitError(f"{folder / 'result.json'} is not a JSON object")
    config, model_kwargs = _read_checkpoint(folder)
    run = Run(folder, result, config, _read_history(folder / "metrics.jsonl"), model_kwargs or {})
    run.recipe = config.get("recipe") or _infer_recipe(config)
    return run


def find_runs(runs_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run folder (holding ``result.json``) in or under ``runs_dirs``, sorted by dataset, model, path."""
    seen: set[Path] = set()
    runs: list[Run] = []
    for root in runs_dirs:
        root = Path(root)
        if not root.exists():
            raise OnebitError(f"runs folder {root} does not exist")
        candidates = [root / "result.json"] if (root / "result.json").is_file() else sorted(root.rglob("result.json"))
        for result_file in candidates:
            folder = result_file.parent.resolve()
            if folder not in seen:
                seen.add(folder)
                runs.append(load_run(result_file.parent))
    runs.sort(key=lambda r: (r.dataset, r.is_float, r.model, str(r.path)))
    return runs


# --------------------------------------------------------------------------- recipes and twins
_RECIPE_KEYS = ("model", "dataset", "model_kwargs", "batch_size", "lr", "lr_end", "optimizer", "lr_scaling",
                "weight_decay", "scheduler", "loss", "augment", "val_fraction")


def _infer_recipe(config: dict) -> str | None:
    """The recipe whose settings (all but epochs, seed and paths) the config has, if any."""
    if not config:
        return None
    try:
        from .recipes import list_recipes, recipe_config

        names = list_recipes()
        for twin in (False, True):
            for name in names:
                candidate = dataclasses.asdict(recipe_config(name, twin=twin))
                if all(_same(candidate.get(k), config.get(k)) for k in _RECIPE_KEYS):
                    return f"{name} (float twin)" if twin and candidate["model"] != recipe_config(name).model else name
    except OnebitError:
        return None
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _twin_model(run: Run) -> str | None:
    from .recipes import float_twin_of

    if run.recipe and not run.recipe.endswith("(float twin)"):
        try:
            from .recipes import load_recipe

            twin = load_recipe(run.recipe).get("float_twin")
            if twin and twin != run.model:
                return twin
        except OnebitError:
            pass
    return float_twin_of(run.model)


def family(run: Run) -> str:
    """The architecture a run trains, shared by a network and its float twin: ``mlp``, ``cnn``, ``wrn``, ..."""
    name = run.model if run.is_float else (_twin_model(run) or run.model)
    return name.removeprefix("float_")


def _layer_shapes(run: Run) -> tuple | None:
    """The (name, shape) of every parameter and buffer of the run's model, built on the meta device."""
    import torch

    from .models import create_model

    kwargs = dict(run.model_kwargs)
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
    try:
        with torch.device("meta"):
            model = create_model(run.model, **kwargs)
    except Exception:  # an old or foreign checkpoint: fall back to comparing arguments
        return None
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _saved_activation_mib(run: Run) -> float | None:
    """Activation memory saved for backward by one training batch of the run's model (with its
    compressed learning, if any), measured on a freshly built copy by :mod:`onebit.memory`."""
    import contextlib

    import torch

    from .memory import compressed_activations, saved_activation_bytes
    from .models import create_model
    from .train import TrainConfig, model_kwargs_for

    try:
        # a checkpoint's model_kwargs hold in_shape and num_classes too, which a TrainConfig refuses
        kwargs = {**model_kwargs_for(TrainConfig(model=run.model, dataset=run.dataset)), **run.model_kwargs}
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
        model = create_model(run.model, **kwargs)
        batch = torch.zeros(int(run.config["batch_size"]), *kwargs["in_shape"])
    except Exception:  # an old or foreign run: leave the cell empty
        return None
    code = run.config.get("compressed")
    compression = compressed_activations(model, code=code) if code else contextlib.nullcontext()
    with compression:
        saved = saved_activation_bytes(model.train(), batch)
    return saved.activations / 2**20


# onebit.train imports torch, which the command line's parser (built from this module) must not need
def _config_defaults() -> dict:
    from .train import config_defaults

    return config_defaults()


def _settings(config: dict) -> dict:
    from .train import experiment_settings

    return experiment_settings(config)


# a float twin differs here by design (lr_scaling is for binary weights; model_kwargs are compared
# after the quantization arguments are dropped); the recipe name is a label, not a setting
_TWIN_MAY_DIFFER = ("model", "model_kwargs", "lr_scaling", "recipe")


def twin_differences(run: Run, twin: Run) -> list[str]:
    """The training settings in which ``twin`` was not trained like ``run``, as ``key=twin's value``
    (settings a run folder predates count as their defaults)."""
    from .recipes import twin_model_kwargs

    mine, theirs = _settings(run.config), _settings(twin.config)
    # a setting moot for one of the two (distillation without a teacher) is no difference: the setting
    # that made it moot (teacher=None) is listed instead
    differences = [f"{k}={theirs[k]}" for k in sorted((set(mine) & set(theirs)) - set(_TWIN_MAY_DIFFER))
                   if mine[k] != theirs[k]]
    my_kwargs, their_kwargs = twin_model_kwargs(run.model_kwargs), twin_model_kwargs(twin.model_kwargs)
    # a model argument left out means the model's default, which only the model knows: compare shared ones
    differences += [f"-m {k}={their_kwargs[k]}" for k in sorted(set(my_kwargs) & set(their_kwargs))
                    if k not in ("in_shape", "num_classes") and my_kwargs[k] != their_kwargs[k]]
    return differences


def _pair_twins(runs: list[Run]) -> None:
    shapes = {id(r): _layer_shapes(r) for r in runs}

    def architecture(run: Run):
        if shapes[id(run)] is not None:
            return shapes[id(run)]
        from .recipes import twin_model_kwargs

        return json.dumps(twin_model_kwargs(run.model_kwargs), sort_keys=True, default=str)

    for run in runs:
        if run.is_float:
            continue
        twin_model = _twin_model(run)
        candidates = [
            r for r in runs
            if r.model == twin_model and r.dataset == run.dataset and r.error is not None
            and architecture(r) == architecture(run)
        ]
        if candidates:
            def same_recipe(r: Run) -> bool:
                return (r.recipe or "").removesuffix(" (float twin)") == (run.recipe or "")

            candidates.sort(key=lambda r: (len(twin_differences(run, r)), abs(r.epochs - run.epochs),
                                           not same_recipe(r), r.config.get("seed") != run.config.get("seed"),
                                           str(r.path)))
            run.twin = candidates[0]


# --------------------------------------------------------------------------- commands
def _cli_value(value: Any) -> str:
    if isinstance(value, str):
        import ast

        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return value if parsed == value else repr(value)
    return repr(value)


_ALWAYS = ("dataset", "epochs", "batch_size", "lr", "optimizer", "scheduler", "loss")


def train_command(config: dict) -> str:
    """The ``onebit train`` command line that reproduces a run's ``config`` (a TrainConfig as a dict).

    Dataset, epochs, batch size, learning rate, optimizer, schedule and loss are always written;
    the other settings only where they differ from TrainConfig's defaults; ``threads``,
    ``progress`` and ``resume`` (which do not change the result) never.
    """
    defaults = _config_defaults()
    parts = ["onebit", "train", str(config["model"])]
    flags = [
        ("dataset", "--dataset"), ("data_dir", "--data-dir"), ("epochs", "--epochs"),
        ("batch_size", "--batch-size"), ("lr", "--lr"), ("lr_end", "--lr-end"), ("optimizer", "--optimizer"),
        ("weight_decay", "--weight-decay"), ("scheduler", "--scheduler"), ("loss", "--loss"),
        ("val_fraction", "--val-fraction"), ("seed", "--seed"), ("device", "--device"),
    ]
    for key, flag in flags:
        value = config.get(key, defaults.get(key))
        if key in _ALWAYS or (value is not None and not _same(value, defaults.get(key))):
            parts += [flag, value if isinstance(value, str) else repr(value)]
    for key, value in (config.get("model_kwargs") or {}).items():
        parts += ["-m", f"{key}={_cli_value(value)}"]
    for key, flag in (("lr_scaling", "--lr-scaling"), ("augment", "--augment"), ("flip", "--flip"),
                      ("sync_bn", "--sync-bn"), ("amp", "--amp"), ("recompute_bn", "--recompute-bn")):
        if config.get(key):
            parts.append(flag)
    if config.get("augment") and config.get("crop_padding") is not None:
        parts += ["--crop-padding", str(config["crop_padding"])]
    for key, flag in (("cutout", "--cutout"), ("compressed", "--compressed"), ("teacher", "--teacher")):
        if config.get(key):
            parts += [flag, str(config[key])]
    if config.get("teacher"):
        parts += ["--distill-weight", repr(config.get("distill_weight", defaults["distill_weight"])),
                  "--distill-temperature", repr(config.get("distill_temperature", defaults["distill_temperature"]))]
    for option, flag in (("optimizer_kwargs", "--optimizer-arg"), ("scheduler_kwargs", "--scheduler-arg")):
        for key, value in (config.get(option) or {}).items():
            parts += [flag, f"{key}={_cli_value(value)}"]
    if config.get("out"):
        parts += ["--out", str(config["out"])]
    return " ".join(_quote(str(p)) for p in parts)


def _quote(word: str) -> str:
    """Shell quoting that stays readable for Python literals: ``"x={'bits': 2}"`` rather than shlex's ``'"'"'``."""
    quoted = shlex.quote(word)
    if quoted == word or "'" not in word or any(c in word for c in '"$`\\!'):
        return quoted
    return f'"{word}"'


# --------------------------------------------------------------------------- rendering
def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt_err(error: float | None) -> str:
    return "—" if error is None else f"{error:.2f}%"


def _label(run: Run) -> str:
    return f"{run.recipe} (`{run.model}`)" if run.recipe else f"`{run.model}`"


def _matches_paper(run: Run, entry: dict) -> bool:
    if run.model != entry["model"] or run.dataset != entry["dataset"] or run.error is None:
        return False
    if entry.get("loss") and run.config.get("loss") != entry["loss"]:
        return False
    return not any(k in (run.config.get("model_kwargs") or {}) for k in _QUANTIZER_OVERRIDES)


def _repeats(runs: Sequence[Run]) -> list[list[Run]]:
    """``runs`` grouped by every training setting but the seed (and paths), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(_settings(run.config), sort_keys=True, default=str), []).append(run)
    return list(groups.values())


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that share every training setting but the seed (and paths), in groups of two or more."""
    measured = [run for run in runs if run.config.get("model") and run.error is not None]
    return [group for group in _repeats(measured) if len({r.config.get("seed") for r in group}) >= 2]


def compressed_pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """Each compressed-learning run with the run trained exactly like it but with exact gradients
    (every setting equal but ``compressed``; the same seed), where one exists."""
    def key(run: Run) -> str:
        settings = _settings(run.config)
        settings.pop("compressed", None)
        return json.dumps({**settings, "seed": run.config.get("seed", 0)}, sort_keys=True, default=str)

    exact = {key(r): r for r in runs if r.config.get("model") and not r.config.get("compressed") and r.error is not None}
    return [(r, exact[key(r)]) for r in runs
            if r.config.get("compressed") and r.error is not None and key(r) in exact]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _difference(run: Run, others: Sequence[Run]) -> str:
    """How ``run``'s settings differ from those of the most similar of ``others`` (all of the equally
    similar ones), e.g. ``loss=cross_entropy``."""
    def flat(config: dict) -> dict:
        items = {k: v for k, v in _settings(config).items() if k != "model_kwargs"}
        items.update({f"-m {k}": v for k, v in (config.get("model_kwargs") or {}).items()})
        return items

    mine = flat(run.config)

    def differing(other: Run) -> list[str]:
        theirs = flat(other.config)
        return [k for k in sorted(set(mine) | set(theirs)) if not _same(mine.get(k), theirs.get(k))]

    if not others:
        return "—"
    fewest = min(len(differing(o)) for o in others)
    # several groups can be equally near (one differs in the model, another in a setting): name every difference
    keys = sorted({k for o in others if len(differing(o)) == fewest for k in differing(o)})
    # a model argument the run left out is the model's default, which only the model knows
    return ", ".join(f"{k}={mine[k]}" if k in mine else f"{k} (model default)" for k in keys) or "—"


def _twin_group(group: Sequence[Run], groups: Sequence[Sequence[Run]]) -> Sequence[Run] | None:
    """The repeated float runs that are the twins of ``group``'s runs, if they form one group."""
    twins = {id(r.twin) for r in group if r.twin is not None}
    found = [g for g in groups if twins & {id(r) for r in g}]
    return found[0] if len(found) == 1 else None


def render_markdown(runs: list[Run], figures: dict[str, str], sources: Sequence[str] = ()) -> str:
    """The report's markdown for ``runs`` (twins paired); ``figures`` maps a title → relative PNG path."""
    lines = [
        "# Results",
        "",
        "<!-- generated by `onebit report`; edit the runs, not this file -->",
        "",
        f"Generated from {len(runs)} run folder(s)" + (f" under {', '.join(f'`{s}`' for s in sources)}" if sources else "")
        + ". Test error = 100 % − test accuracy on the dataset's test split; the float twin is the run",
        "of the same architecture in full precision on the same data, trained with the same settings where such a run",
        "exists (otherwise the twin's other settings are listed); gap = error − twin's error (percentage points).",
        "Wall time: `result.json`'s seconds (or the sum of per-epoch seconds in `metrics.jsonl` for resumed runs).",
        "",
        "| # | run | recipe / model | dataset | epochs | wall time | test error | float twin error | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs, 1):
        twin_err = run.twin.error if run.twin else None
        gap = f"{run.error - twin_err:+.2f} pp" if run.error is not None and twin_err is not None else "—"
        if run.twin:
            differences = twin_differences(run, run.twin)
            trained = f"; trained with {', '.join(differences)}" if differences else ""
            twin = f"{_fmt_err(twin_err)} ({run.twin.name}{trained})"
        else:
            twin = "(float)" if run.is_float else "—"
        flag = " (interrupted)" if run.result.get("interrupted") else ""
        lines.append(
            f"| {i} | {run.name}{flag} | {_label(run)} | {run.dataset} | {run.epochs} | {_fmt_time(run.seconds)} "
            f"| {_fmt_err(run.error)} | {twin} | {gap} |"
        )
    lines += ["", "## Commands", "", "Each row's run, reproduced exactly (`--out` as it was recorded):", ""]
    for i, run in enumerate(runs, 1):
        command = train_command(run.config) if run.config.get("model") else "(no config.json or checkpoint in the run folder)"
        lines += [f"{i}. **{run.name}**", "", "   ```bash", f"   {command}", "   ```", ""]

    lines += ["## Compared with the papers", "",
              "| setting | published error | source | ours | our run |", "|---|---|---|---|---|"]
    for entry in PAPER_RESULTS:
        matches = sorted((r for r in runs if _matches_paper(r, entry)), key=lambda r: r.error)
        if matches:
            best = matches[0]
            ours, which = _fmt_err(best.error), f"{best.name} ({best.epochs} epochs)"
        else:
            ours, which = "—", "no matching run"
        lines.append(f"| {entry['setting']} | {entry['error']:.2f}% | {entry['source']} | {ours} | {which} |")
    lines.append("")

    groups = seed_groups(runs)
    if groups:
        lines += ["## Repeated runs (mean ± sample std over seeds)", "",
                  "Each group's float twin group holds the float twins of its runs; the gap is between the means.", "",
                  "| setting | differs from the nearest group in | dataset | epochs | seeds | test error "
                  "| float twin group's error | gap | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for group in groups:
            first = group[0]
            others = [g[0] for g in groups if g is not group and g[0].dataset == first.dataset]
            mean, std = _mean_std([r.error for r in group])
            seeds = ", ".join(str(r.config.get("seed")) for r in group)
            twins = _twin_group(group, groups)
            if twins:
                twin_mean, twin_std = _mean_std([r.error for r in twins])
                twin_cell, gap = f"{twin_mean:.2f} ± {twin_std:.2f}%", f"{mean - twin_mean:+.2f} pp"
            else:
                twin_cell, gap = ("(float)" if first.is_float else "—"), "—"
            lines.append(f"| {_label(first)} | {_difference(first, others)} | {first.dataset} | {first.epochs} | "
                         f"{seeds} | {mean:.2f} ± {std:.2f}% | {twin_cell} | {gap} | {', '.join(r.name for r in group)} |")
        lines.append("")

    pairs = compressed_pairs(runs)
    if pairs:
        lines += ["## What compressed learning costs", "",
                  "Each compressed-learning run against the run with every setting (seed included) equal but",
                  "exact gradients; cost = the difference in test error.", "",
                  "| run | activation code | test error | exact-gradient run | its error | cost | seconds per epoch |",
                  "|---|---|---|---|---|---|---|"]
        for run, exact in pairs:
            lines.append(f"| {run.name} | {run.config['compressed']} | {_fmt_err(run.error)} | {exact.name} | "
                         f"{_fmt_err(exact.error)} | {run.error - exact.error:+.2f} pp | "
                         f"{(run.seconds or 0.0) / max(run.epochs, 1):.0f} s vs {(exact.seconds or 0.0) / max(exact.epochs, 1):.0f} s |")
        lines.append("")

    measured = [r for r in runs if r.result.get("peak_rss_mib") is not None]
    if measured:
        lines += ["## Memory and time per epoch", "",
                  "Peak RSS: the training process's high-water mark (data, model, optimizer state, activations);",
                  "compressed learning keeps a 1- to 3-bit copy of each ReLU activation for the backward pass",
                  "(`onebit.memory`). Saved activations: what autograd keeps for the backward pass of one",
                  "training batch, measured with `saved_tensors_hooks` on a fresh copy of the run's model.", "",
                  "| run | recipe / model | compressed learning | batch | seconds per epoch | saved activations per batch "
                  "| peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for run in measured:
            per_epoch = (run.seconds or 0.0) / max(run.epochs, 1)
            saved = _saved_activation_mib(run)
            lines.append(f"| {run.name} | {_label(run)} | {run.config.get('compressed') or '—'} | "
                         f"{run.config.get('batch_size', '—')} | {per_epoch:.0f} s | "
                         f"{'—' if saved is None else f'{saved:,.1f} MiB'} | "
                         f"{float(run.result['peak_rss_mib']):,.0f} MiB |")
        lines.append("")

    if figures:
        lines += ["## Training curves", ""]
        for title, rel in sorted(figures.items()):
            lines += [f"### {title}", "", f"![train and validation accuracy per epoch, {title}]({rel})", ""]
    return "\n".join(lines)


def _curves_title(dataset: str, architecture: str | None) -> str:
    return f"{dataset}, {architecture} networks" if architecture else dataset


def _accuracy_text(group: Sequence[Run]) -> str:
    errors = [r.error for r in group if r.error is not None]
    if not errors:
        return "no test result"
    accuracies = [100.0 - e for e in errors]
    mean = f"{sum(accuracies) / len(accuracies):.2f}%"
    return f"mean {mean}" if len(accuracies) > 1 else mean


def _panel_title(group: Sequence[Run], twins: Sequence[Run]) -> str:
    seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
    text = f"{group[0].name}{seeds}\ntest {_accuracy_text(group)}"
    return f"{text}, float twin {_accuracy_text(twins)}" if twins else text


def curve_panels(runs: Sequence[Run], dataset: str,
                 architecture: str | None = None) -> list[tuple[list[Run], list[Run]]]:
    """The panels of :func:`plot_curves`: (an experiment's runs, seeds together; their float twins).
    A float run that is some shown run's twin appears beside it, not in a panel of its own."""
    shown = [r for r in runs if r.dataset == dataset and r.history and architecture in (None, family(r))]
    twin_ids = {id(r.twin) for r in shown if not r.is_float and r.twin is not None}
    panels = []
    for group in _repeats([r for r in shown if not (r.is_float and id(r) in twin_ids)]):
        twins = {id(r.twin): r.twin for r in group if r.twin is not None and r.twin.history}
        panels.append((group, list(twins.values())))
    return panels


def plot_curves(runs: list[Run], dataset: str, path: str | os.PathLike, architecture: str | None = None) -> Path:
    """Train (dashed) and validation (solid) accuracy per epoch of the runs on ``dataset`` (of the
    :func:`family` ``architecture`` only, if given), as a PNG of small multiples: one panel per
    experiment (its seeds together), with its float twin's curves in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = curve_panels(runs, dataset, architecture)
    if not panels:
        raise OnebitError(f"no runs with per-epoch metrics on {_curves_title(dataset, architecture)} to plot")
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.8), squeeze=False,
                             layout="constrained")
    try:
        for ax, (group, twins) in zip(axes.flat, panels):
            for members, color in ((twins, "0.6"), (group, "C0")):
                for run in members:
                    epochs = [row["epoch"] for row in run.history]
                    if any("val_accuracy" in row for row in run.history):
                        ax.plot(epochs, [row.get("val_accuracy", math.nan) for row in run.history], "-", color=color)
                    ax.plot(epochs, [row.get("train_accuracy", math.nan) for row in run.history], "--", color=color)
            ax.set_title(_panel_title(group, twins), fontsize="small")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.tick_params(labelsize="x-small")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{_curves_title(dataset, architecture)}: accuracy per epoch")
        key = [matplotlib.lines.Line2D([], [], color=c, linestyle=style, label=label)
               for c, style, label in (("C0", "-", "validation"), ("C0", "--", "train"),
                                        ("0.6", "-", "float twin, validation"), ("0.6", "--", "float twin, train"))]
        fig.legend(handles=key, loc="outside lower center", fontsize="small", ncol=4, frameon=False)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def build_report(
    runs_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_md: str | os.PathLike,
    figures_dir: str | os.PathLike | None = None,
) -> list[Run]:
    """Read every run under ``runs_dirs`` and write the markdown report ``out_md`` and one curve PNG
    per dataset and architecture (:func:`family`) into ``figures_dir`` (default: ``figures/`` beside
    ``out_md``). Returns the runs."""
    check_output_files(out_md)
    if isinstance(runs_dirs, (str, os.PathLike)):
        runs_dirs = [runs_dirs]
    runs = find_runs(runs_dirs)
    if not runs:
        raise OnebitError(f"no run folders (with result.json) under {', '.join(map(str, runs_dirs))}")
    _pair_twins(runs)
    out_md = Path(out_md)
    figures_dir = Path(figures_dir) if figures_dir is not None else out_md.parent / "figures"
    figures: dict[str, str] = {}
    for dataset, architecture in sorted({(r.dataset, family(r)) for r in runs if r.history}):
        png = plot_curves(runs, dataset, figures_dir / f"curves_{dataset}_{architecture}.png", architecture)
        figures[_curves_title(dataset, architecture)] = os.path.relpath(png, out_md.parent).replace(os.sep, "/")
    text = render_markdown(runs, figures, [str(d) for d in runs_dirs])
    with atomic_write(out_md, "w") as handle:
        handle.write(text)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report command's arguments (``onebit report``)."""
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR", help="run folders, or folders holding run folders")
    parser.add_argument("-o", "--out", default="docs/results.md", help="markdown file to write (default docs/results.md)")
    parser.add_argument("--figures", help="folder for the curve PNGs (default: figures/ beside --out)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Build the report for parsed ``args`` (see :func:`add_arguments`)."""
    runs = build_report(args.runs_dirs, args.out, args.figures)
    print(f"{len(runs)} runs -> {args.out}")
    return 0
