"""Training recipes: the published settings of the papers, one small commented TOML file each.

A recipe fixes everything a :class:`~onebit.train.TrainConfig` holds about *what* is trained
and *how* (model and its arguments, dataset, epochs, batch size, optimizer, learning-rate
range and schedule, loss, ...), each value with a comment citing the paper section or the
authors' code it comes from. The files live in ``onebit/recipe_files/``::

    from onebit.recipes import list_recipes, load_recipe, recipe_config
    list_recipes()                                  # ['binaryconnect_fmnist', 'binaryconnect_mnist', ...]
    load_recipe("binarynet_mnist")["lr"]            # 0.003
    config = recipe_config("binarynet_mnist", epochs=20, out="runs/bnn")       # a TrainConfig
    twin = recipe_config("binarynet_mnist", twin=True, epochs=20)              # its float baseline

File format (TOML, read with the standard library's ``tomllib``, Python 3.11+):

* top-level keys: the TrainConfig fields in :data:`TRAIN_KEYS`, plus ``description`` (one
  line), ``float_twin`` (the registered float model that is this recipe's full-precision
  baseline) and ``extends`` (another recipe's name: start from it, then apply this file's
  keys; tables such as ``[model_kwargs]`` are merged key by key);
* ``[model_kwargs]``: keyword arguments of the model; TOML has no null, so the string
  ``"none"`` stands for Python ``None`` (e.g. ``weight_clip = "none"``);
* ``[optimizer_kwargs]`` and ``[scheduler_kwargs]``: the optimizer's options (SGD's
  ``momentum``, Bop's ``threshold``) and the schedule's (SGDR's ``t0``).

Unknown keys raise :class:`~onebit.errors.ConfigError` naming the key; an unknown recipe name
raises :class:`~onebit.errors.UnknownNameError` listing the valid ones.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from functools import lru_cache
from importlib import resources
from typing import Any

from .errors import ConfigError, UnknownNameError

__all__ = [
    "META_KEYS",
    "NONE",
    "QUANTIZATION_KWARGS",
    "TRAIN_KEYS",
    "describe_recipe",
    "float_twin_of",
    "list_recipes",
    "load_recipe",
    "recipe_config",
    "recipe_dir",
    "recipe_text",
    "twin_model_kwargs",
]

#: The TOML spelling of Python ``None`` in ``[model_kwargs]`` (TOML has no null).
NONE = "none"

#: Top-level recipe keys that are TrainConfig fields, with the TOML types they accept.
TRAIN_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "dataset": (str,),
    "model_kwargs": (dict,),
    "epochs": (int,),
    "batch_size": (int,),
    "lr": (float, int),
    "lr_end": (float, int),
    "optimizer": (str,),
    "lr_scaling": (bool,),
    "loss": (str,),
    "scheduler": (str,),
    "augment": (bool,),
    "weight_decay": (float, int),
    "val_fraction": (float, int),
    "seed": (int,),
    "scheduler_kwargs": (dict,),
    "optimizer_kwargs": (dict,),
    "flip": (bool,),
    "cutout": (int,),
    "crop_padding": (int,),
    "compressed": (str,),
    "recompute_bn": (bool,),
}

#: Top-level recipe keys that are not TrainConfig fields.
META_KEYS: dict[str, tuple[type, ...]] = {
    "description": (str,),
    "float_twin": (str,),
    "extends": (str,),
}

#: Model arguments that only make sense for a quantized model; the float twin drops them.
QUANTIZATION_KWARGS = frozenset(
    {
        "weight_quantizer",
        "input_quantizer",
        "weight_quantizer_args",
        "input_quantizer_args",
        "weight_clip",
        "float_first_last",
    }
)

_REQUIRED = ("model", "dataset")
_PACKAGE_DIR = "recipe_files"


def recipe_dir():
    """The folder (an ``importlib.resources`` traversable) holding the recipe TOML files."""
    return resources.files("onebit").joinpath(_PACKAGE_DIR)


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ConfigError("recipes need Python 3.11 or newer (the standard library's tomllib)") from None
    return tomllib


def _files() -> dict[str, Any]:
    return {
        entry.name[: -len(".toml")]: entry
        for entry in recipe_dir().iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    }


def list_recipes() -> list[str]:
    """The recipe names, sorted."""
    return sorted(_files())


def _unknown(name: object) -> UnknownNameError:
    return UnknownNameError(f"unknown recipe {name!r}; valid: {', '.join(list_recipes())}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(name: str, key: str, value: object, types: tuple[type, ...]) -> None:
    if bool in types:
        ok = isinstance(value, bool)
    elif float in types:
        ok = _is_number(value) and math.isfinite(value)
    elif int in types:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"recipe {name}: {key} must be {want}, got {value!r}")


def _read(name: str) -> dict:
    files = _files()
    if name not in files:
        raise _unknown(name)
    tomllib = _toml()
    try:
        return tomllib.loads(files[name].read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {name}: invalid TOML: {exc}") from None


def _resolve(name: str, chain: tuple[str, ...] = ()) -> dict:
    """The recipe's raw keys with ``extends`` applied (base first, then this file)."""
    if name in chain:
        raise ConfigError(f"recipe {name}: 'extends' forms a cycle: {' -> '.join(chain + (name,))}")
    raw = _read(name)
    for key in raw:
        if key not in TRAIN_KEYS and key not in META_KEYS:
            valid = ", ".join(sorted({*TRAIN_KEYS, *META_KEYS}))
            raise ConfigError(f"recipe {name}: unknown key {key!r}; valid: {valid}")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"recipe {name}: extends must be a recipe name, got {base_name!r}")
    if base_name not in _files():
        raise ConfigError(f"recipe {name}: extends unknown recipe {base_name!r}; valid: {', '.join(list_recipes())}")
    merged = _resolve(base_name, chain + (name,))
    for key, value in raw.items():
        base = merged.get(key)
        if isinstance(value, dict) and isinstance(base, dict):  # a table: merged key by key
            value = {**base, **value}
        merged[key] = value
    merged.setdefault("model_kwargs", {})
    return merged


def _decode_kwargs(name: str, kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"recipe {name}: model_kwargs key {key!r} is not a keyword name")
        out[key] = None if value == NONE else value
    return out


def _validate(name: str, recipe: dict) -> None:
    from .data import DATASETS
    from .losses import LOSSES
    from .models import MODELS
    from .optim import OPTIMIZERS, SCHEDULERS

    for key in _REQUIRED:
        if key not in recipe:
            raise ConfigError(f"recipe {name}: missing required key {key!r}")
    for key, value in recipe.items():
        types = TRAIN_KEYS.get(key) or META_KEYS[key]
        _check_type(name, key, value, types)
    for key, registry in (
        ("model", MODELS),
        ("float_twin", MODELS),
        ("dataset", DATASETS),
        ("loss", LOSSES),
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
    ):
        if key in recipe and recipe[key] not in registry:
            raise ConfigError(f"recipe {name}: {key} {recipe[key]!r} is not registered; valid: {', '.join(registry.names())}")
    for key in ("epochs", "batch_size"):
        if key in recipe and recipe[key] < 1:
            raise ConfigError(f"recipe {name}: {key} must be at least 1, got {recipe[key]}")
    for key in ("lr", "lr_end"):
        if key in recipe and not recipe[key] > 0:
            raise ConfigError(f"recipe {name}: {key} must be positive, got {recipe[key]}")
    if "val_fraction" in recipe and not 0 <= recipe["val_fraction"] < 1:
        raise ConfigError(f"recipe {name}: val_fraction must be in [0, 1), got {recipe['val_fraction']}")


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    if not isinstance(name, str):
        raise _unknown(name)
    recipe = _resolve(name)
    recipe["model_kwargs"] = _decode_kwargs(name, recipe.get("model_kwargs", {}))
    _validate(name, recipe)
    for key in ("lr", "lr_end", "weight_decay", "val_fraction"):
        if key in recipe:
            recipe[key] = float(recipe[key])
    recipe["name"] = name
    return recipe


def load_recipe(name: str) -> dict:
    """The validated recipe ``name`` as a dict: TrainConfig keys, ``model_kwargs``, ``float_twin``,
    ``description`` and ``name`` (``extends`` resolved). A fresh copy on every call."""
    return copy.deepcopy(_load(name))


def recipe_text(name: str) -> str:
    """The recipe file's text, comments (the sources) included."""
    files = _files()
    if name not in files:
        raise _unknown(name)
    return files[name].read_text(encoding="utf-8")


def describe_recipe(name: str) -> str:
    """The recipe's one-line description (for listings)."""
    return _load(name).get("description", "")


def float_twin_of(model: str) -> str | None:
    """The float baseline of a model name by onebit's naming: ``*_mlp`` → ``float_mlp``, ``*_cnn`` → ``float_cnn``;
    None for a float model or a name without such a suffix."""
    if model.startswith("float_"):
        return None
    for suffix in ("_mlp", "_cnn"):
        if model.endswith(suffix):
            return f"float{suffix}"
    return None


def twin_model_kwargs(model_kwargs: dict) -> dict:
    """``model_kwargs`` without the quantization arguments (:data:`QUANTIZATION_KWARGS`)."""
    return {k: v for k, v in model_kwargs.items() if k not in QUANTIZATION_KWARGS}


def recipe_config(name: str, twin: bool = False, **overrides):
    """The :class:`~onebit.train.TrainConfig` of recipe ``name``, with ``overrides`` applied.

    ``overrides`` are TrainConfig fields (``epochs=20``, ``out="runs/x"``, ``data_dir=...``);
    those whose value is None are ignored, so a command line can pass every option it has and
    leave unset ones to the recipe. ``model_kwargs`` is merged into the recipe's (its keys win).
    ``twin=True`` gives the recipe's float baseline: ``model`` becomes ``float_twin``, the
    quantization arguments are dropped from ``model_kwargs`` and ``lr_scaling`` is off; every
    other setting is the recipe's. ``out`` defaults to ``runs/<name>`` (``runs/<name>-float``).
    If TrainConfig has a ``recipe`` field it is set to ``name``.
    """
    from .train import TrainConfig

    recipe = load_recipe(name)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in recipe.items() if k in TRAIN_KEYS}
    if twin:
        twin_model = recipe.get("float_twin") or float_twin_of(recipe["model"])
        if twin_model is None:
            raise ConfigError(f"recipe {name} names no float_twin")
        settings["model"] = twin_model
        settings["model_kwargs"] = twin_model_kwargs(settings.get("model_kwargs", {}))
        settings["lr_scaling"] = False
    settings["out"] = f"runs/{name}-float" if twin and recipe["model"] != settings["model"] else f"runs/{name}"
    if "recipe" in fields:
        settings["recipe"] = name
    for key, value in overrides.items():
        if key not in fields or key == "recipe":
            raise ConfigError(f"unknown training setting {key!r} for recipe {name}; valid: {', '.join(sorted(fields - {'recipe'}))}")
        if value is None:
            continue
        if key == "model_kwargs":
            settings["model_kwargs"] = {**settings.get("model_kwargs", {}), **dict(value)}
        else:
            settings[key] = value
    return TrainConfig(**settings)
