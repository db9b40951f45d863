"""Optimizers and learning-rate schedules for latent-weight and latent-free binary training.

* :func:`build_optimizer` — ``"adam"``, ``"sgd"`` or ``"bop"`` (registry :data:`OPTIMIZERS`),
  with parameter groups that keep weight decay off BatchNorm parameters and biases and,
  with ``lr_scaling=True``, give every binary layer's latent weight BinaryNet's per-layer
  learning-rate scale (:func:`binarynet_lr_scales`).
* :class:`Bop` — Helwegen et al.'s Binary Optimizer, which flips ±1 weights directly; for
  ``"bop"``, :func:`build_optimizer` returns a :class:`CombinedOptimizer` of Bop (binary
  weights) and Adam (everything else).
* :func:`build_scheduler` — ``"constant"``, ``"exponential"``, ``"cosine"``, ``"sgdr"``
  (registry :data:`SCHEDULERS`).

Every group built here carries ``"lr_scale"`` (its lr over the nominal lr) and ``"base_lr"``
(the nominal lr). A schedule multiplies each group's *initial* lr (``group["initial_lr"]``,
which already includes the scale) by one common factor, so per-layer ratios, and Bop's γ
relative to Adam's lr, stay fixed over the run::

    from onebit.optim import build_optimizer, build_scheduler
    optimizer = build_optimizer(model, "adam", 3e-3, lr_scaling=True)
    scheduler = build_scheduler(optimizer, "exponential", epochs=100, steps_per_epoch=500, lr_end=3e-7)
    for epoch in range(100):
        for x, y in loader:
            ...; optimizer.step(); scheduler.step_batch()
        scheduler.step_epoch()

A binary layer is any module with a ``weight`` parameter and a ``weight_quantizer`` whose
``precision`` is 1 (:class:`onebit.layers.QuantLinear` / :class:`~onebit.layers.QuantConv2d`
with a sign-like weight quantizer); this module needs only torch.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import CheckpointError, OnebitError
from .registry import Registry

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Bop",
    "CombinedOptimizer",
    "LRSchedule",
    "binary_layers",
    "binarynet_lr_scale",
    "binarynet_lr_scales",
    "build_optimizer",
    "build_scheduler",
    "constant",
    "cosine_annealing",
    "cosine_warm_restarts",
    "exponential_decay",
    "param_groups",
]

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


# --------------------------------------------------------------------------- binary layers
def _is_binary_layer(module: nn.Module) -> bool:
    quantizer = getattr(module, "weight_quantizer", None)
    weight = getattr(module, "weight", None)
    return (
        quantizer is not None
        and getattr(quantizer, "precision", 32) == 1
        and isinstance(weight, nn.Parameter)
        and weight.ndim >= 2
    )


def binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of ``model`` whose weight is quantized to 1 bit."""
    return [(name, m) for name, m in model.named_modules() if _is_binary_layer(m)]


def binarynet_lr_scale(weight: torch.Tensor) -> float:
    """BinaryNet's learning-rate scale of one layer, ``1 / H`` with ``H = sqrt(1.5 / (fan_in + fan_out))``.

    ``weight`` is shaped like an ``nn.Linear`` (out, in) or ``nn.Conv2d`` (out, in/groups, kh, kw)
    weight: fan_in = in·kh·kw, fan_out = out·kh·kw, as in Courbariaux et al.'s
    ``Train-time/binary_net.py`` (Conv2DLayer)::

        num_inputs = int(np.prod(filter_size)*incoming.output_shape[1])
        num_units = int(np.prod(filter_size)*num_filters)
        self.W_LR_scale = np.float32(1./np.sqrt(1.5 / (num_inputs + num_units)))

    and, for DenseLayer, ``1./np.sqrt(1.5/ (num_inputs + num_units))`` with the layer's input and
    output widths. H is half the bound of Glorot's uniform initialisation, sqrt(6 / (fan_in + fan_out)),
    as BinaryNet's code has it (its "Glorot" H).
    """
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def binarynet_lr_scales(model: nn.Module) -> dict[str, float]:
    """BinaryNet's per-layer learning-rate scale of every binary layer, keyed by the weight's
    parameter name (``"fc1.linear.weight"``); see :func:`binarynet_lr_scale`.

    BinaryNet multiplies the Adam update of each binary layer's latent weight by this scale
    (``updates[param] = param + layer.W_LR_scale*(updates[param] - param)`` in
    ``binary_net.clipping_scaling``), which equals scaling that layer's learning rate.
    """
    return {f"{name}.weight" if name else "weight": binarynet_lr_scale(m.weight) for name, m in binary_layers(model)}


# --------------------------------------------------------------------------- parameter groups
def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    lr_scaling: bool = False,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """Parameter groups of ``model`` for a torch optimizer.

    In order: ``"decay"`` (weights of dimension ≥ 2 not in a scaled group, with
    ``weight_decay``), ``"no_decay"`` (BatchNorm parameters and biases: every parameter of
    dimension ≤ 1, weight decay 0), and with ``lr_scaling`` one group per binary layer,
    named after its weight, with ``lr = lr · scale`` and BinaryNet's scale (weight decay as
    ``"decay"``). Every group has ``"name"``, ``"lr_scale"`` and ``"base_lr"`` (= ``lr``).
    Parameters in ``exclude`` and frozen parameters are left out; empty groups are dropped,
    and with ``weight_decay == 0`` the first two are merged into one group ``"default"``.
    """
    skip = {id(p) for p in exclude}
    seen: set[int] = set()
    scaled: list[dict] = []
    if lr_scaling:
        for name, module in binary_layers(model):
            weight = module.weight
            if id(weight) in skip or id(weight) in seen or not weight.requires_grad:
                continue
            seen.add(id(weight))
            scale = binarynet_lr_scale(weight)
            scaled.append(
                {
                    "params": [weight],
                    "name": f"{name}.weight" if name else "weight",
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "base_lr": lr,
                    "weight_decay": weight_decay,
                }
            )
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in skip or id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 else decay).append(p)

    def group(name: str, params: list, wd: float) -> dict:
        return {"params": params, "name": name, "lr": lr, "lr_scale": 1.0, "base_lr": lr, "weight_decay": wd}

    if weight_decay:
        plain = [group("decay", decay, weight_decay), group("no_decay", no_decay, 0.0)]
    else:
        plain = [group("default", decay + no_decay, 0.0)]
    return [g for g in plain if g["params"]] + scaled


def _check_lr(lr: float, what: str = "learning rate") -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise OnebitError(f"{what} must be a positive number, got {lr!r}")


def _fast_kwargs(groups: list[dict]) -> dict:
    """fused=True (one kernel for all tensors, ~5x faster than the loop on CPU) where torch
    supports it for these tensors, else foreach=True."""
    params = [p for g in groups for p in g["params"]]
    fusable = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fusable else {"foreach": True}


def _adam(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, **_fast_kwargs(groups))


# --------------------------------------------------------------------------- Bop
class Bop(torch.optim.Optimizer):
    """Bop, the Binary Optimizer of Helwegen et al. 2019, "Latent Weights Do Not Exist:
    Rethinking Binarized Neural Network Optimization" (Algorithm 1).

    The weights are ±1 themselves (set to the sign of their initial values, sign(0) = +1,
    when the optimizer is built); there is no latent weight. Each step, per weight::

        m ← (1 − γ)·m + γ·g                      (exponential moving average of the gradient)
        w ← −w   where |m| > τ and sign(m) = sign(w)

    i.e. a weight flips when its gradient has consistently pushed against it. γ (the
    adaptivity rate) is stored in each group under ``"lr"``, so a learning-rate schedule
    anneals it as Helwegen et al. do; τ is ``"threshold"``. Defaults τ = 1e-8, γ = 1e-4 are
    the paper's CIFAR-10 settings (and Larq's).
    """

    def __init__(self, params, threshold: float = 1e-8, gamma: float = 1e-4) -> None:
        if not threshold >= 0:
            raise OnebitError(f"Bop threshold must be ≥ 0, got {threshold!r}")
        if not 0 < gamma <= 1:
            raise OnebitError(f"Bop gamma must be in (0, 1], got {gamma!r}")
        super().__init__(params, {"lr": gamma, "threshold": threshold})
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(torch.where(p >= 0, 1.0, -1.0).to(p.dtype))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            gamma, threshold = group["lr"], group["threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["momentum"]
                m.mul_(1 - gamma).add_(p.grad, alpha=gamma)
                w_positive = p >= 0
                # |m| > τ ≥ 0 excludes m = 0, so the sign test needs no sign(0) convention for m
                flip = (m.abs() > threshold) & ((m > 0) == w_positive)
                p.copy_(torch.where(w_positive != flip, 1.0, -1.0).to(p.dtype))
        return loss


class CombinedOptimizer:
    """Several torch optimizers over disjoint parameters, driven as one.

    ``param_groups`` is the concatenation of theirs (in the order given, the same dict
    objects, so a scheduler that sets ``group["lr"]`` reaches them); ``state_dict`` is
    ``{name: optimizer.state_dict()}``.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        merged: dict = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    @property
    def defaults(self) -> dict:
        return next(iter(self.optimizers.values())).defaults

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != set(self.optimizers):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise CheckpointError(f"optimizer state holds {found}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"CombinedOptimizer({inner})"


# --------------------------------------------------------------------------- optimizers
@OPTIMIZERS.register
def adam(model: nn.Module, lr: float, *, weight_decay: float = 0.0, lr_scaling: bool = False) -> torch.optim.Optimizer:
    """Adam (fused on CPU/CUDA), L2 weight decay on weights only; BinaryNet's optimizer."""
    return _adam(param_groups(model, lr, weight_decay=weight_decay, lr_scaling=lr_scaling), lr)


@OPTIMIZERS.register
def sgd(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    lr_scaling: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with (heavy-ball, or Nesterov) momentum, weight decay on weights only."""
    if not 0 <= momentum < 1:
        raise OnebitError(f"SGD momentum must be in [0, 1), got {momentum!r}")
    if nesterov and momentum == 0:
        raise OnebitError("Nesterov SGD needs a momentum > 0")
    groups = param_groups(model, lr, weight_decay=weight_decay, lr_scaling=lr_scaling)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **_fast_kwargs(groups))


@OPTIMIZERS.register
def bop(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    lr_scaling: bool = False,
    threshold: float = 1e-8,
    gamma: float = 1e-4,
) -> CombinedOptimizer:
    """Bop (Helwegen et al. 2019) flips the binary weights; Adam trains the rest (BN, biases, real layers).

    ``threshold`` (τ) and ``gamma`` (γ, the adaptivity rate) are Bop's; ``lr_scaling`` has no
    meaning without latent weights and is ignored.
    """
    binary = [m.weight for _, m in binary_layers(model) if m.weight.requires_grad]
    if not binary:
        raise OnebitError("optimizer bop needs a model with binary weights; this one has none (use adam or sgd)")
    unique = list({id(p): p for p in binary}.values())
    bop_group = {"params": unique, "name": "binary", "lr": gamma, "lr_scale": gamma / lr,
                 "base_lr": lr, "threshold": threshold}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    rest = param_groups(model, lr, weight_decay=weight_decay, exclude=unique)
    if rest:
        optimizers["adam"] = _adam(rest, lr)
    optimizers["bop"] = Bop([bop_group], threshold=threshold, gamma=gamma)
    return CombinedOptimizer(optimizers)


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    weight_decay: float = 0.0,
    lr_scaling: bool = False,
    **options,
):
    """The optimizer ``name`` (``"adam"``, ``"sgd"``, ``"bop"``) for ``model``'s parameters.

    ``lr_scaling`` gives each binary layer's latent weight BinaryNet's per-layer lr scale
    (Adam and SGD; Bop has no learning rate for binary weights and ignores it). Weight decay
    never applies to BatchNorm parameters or biases. ``options`` are the optimizer's own:
    SGD's ``momentum`` (0.9) and ``nesterov``; Bop's ``threshold`` (τ, 1e-8) and ``gamma``
    (γ, 1e-4). An unknown name raises :class:`onebit.errors.UnknownNameError` listing the
    valid ones; an option the optimizer does not take, :class:`OnebitError` listing its options.
    """
    factory = OPTIMIZERS.get(name)
    _check_lr(lr)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise OnebitError(f"weight decay must be ≥ 0, got {weight_decay!r}")
    _check_options("optimizer", name, factory, options, fixed=("weight_decay", "lr_scaling"))
    return factory(model, lr, weight_decay=weight_decay, lr_scaling=lr_scaling, **options)


def _check_options(kind: str, name: str, factory: Callable, options: dict, fixed: Sequence[str]) -> None:
    """``options`` (from a command line or a recipe) must be keyword options of ``factory`` other
    than the ``fixed`` ones, each of its default's kind: true/false for a flag, else a finite number
    (or None where that is the default)."""
    params = {p.name: p for p in inspect.signature(factory).parameters.values()
              if p.kind is p.KEYWORD_ONLY and p.name not in fixed}
    for key, value in options.items():
        if key not in params:
            raise OnebitError(f"{kind} {name!r} does not take {key!r}; its options: {', '.join(params) or 'none'}")
        default = params[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise OnebitError(f"{kind} option {key} must be True or False, got {value!r}")
        elif not (value is None and default is None) and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise OnebitError(f"{kind} option {key} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------- schedules
class LRSchedule:
    """Sets ``group["lr"] = group["initial_lr"] · factor(t)`` for every group, t in epochs.

    ``initial_lr`` is the group's lr when the schedule is built (kept if already present, as
    torch's schedulers do), so per-group scales survive. t counts finished epochs, plus the
    finished fraction of the current epoch when ``per_batch`` (the lr then changes after every
    batch; otherwise only at epoch ends). Call :meth:`step_batch` after each optimizer step
    and :meth:`step_epoch` after each epoch. ``state_dict`` is plain numbers (checkpointable
    with ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        optimizer,
        factor: Callable[[float], float],
        *,
        steps_per_epoch: int = 1,
        per_batch: bool = False,
        name: str = "custom",
    ) -> None:
        if steps_per_epoch < 1:
            raise OnebitError(f"steps per epoch must be at least 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.factor = factor
        self.steps_per_epoch = int(steps_per_epoch)
        self.per_batch = per_batch
        self.name = name
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.epoch = 0
        self.batch = 0
        self._apply()

    @property
    def progress(self) -> float:
        """Epochs elapsed, as the schedule sees them (fractional only when ``per_batch``)."""
        if not self.per_batch:
            return float(self.epoch)
        return self.epoch + min(self.batch, self.steps_per_epoch) / self.steps_per_epoch

    def factor_at(self, t: float) -> float:
        return float(self.factor(t))

    def _apply(self) -> None:
        f = self.factor_at(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step_batch(self) -> None:
        self.batch += 1
        if self.per_batch:
            self._apply()

    def step_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"name": self.name, "epoch": self.epoch, "batch": self.batch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        try:
            name, epoch, batch, base_lrs = state["name"], int(state["epoch"]), int(state["batch"]), state["base_lrs"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("scheduler state is incomplete") from None
        if name != self.name:
            raise CheckpointError(f"scheduler state is for {name!r}, this schedule is {self.name!r}")
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"scheduler state has {len(base_lrs)} parameter groups, the optimizer {len(self.optimizer.param_groups)}"
            )
        self.epoch, self.batch, self.base_lrs = epoch, batch, [float(b) for b in base_lrs]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self._apply()

    def __repr__(self) -> str:
        return f"LRSchedule({self.name!r}, epoch={self.epoch}, batch={self.batch}, per_batch={self.per_batch})"


def _nominal_lr(optimizer) -> float:
    """The lr the optimizer was built with, before per-layer scales."""
    group = optimizer.param_groups[0]
    return float(group.get("base_lr", group.get("initial_lr", group["lr"])))


def _cosine(t: float, period: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(t / period, 0.0), 1.0)))


def constant(optimizer, *, steps_per_epoch: int = 1) -> LRSchedule:
    """Keep every group's lr."""
    return LRSchedule(optimizer, lambda t: 1.0, steps_per_epoch=steps_per_epoch, name="constant")


def exponential_decay(
    optimizer,
    lr_start: float | None,
    lr_end: float,
    epochs: int,
    *,
    steps_per_epoch: int = 1,
    per_batch: bool = False,
) -> LRSchedule:
    """BinaryNet's schedule: the lr falls geometrically from ``lr_start`` to ``lr_end`` over ``epochs``.

    After epoch e the lr is ``lr_start · (lr_end / lr_start)^(e / epochs)``, i.e. it is
    multiplied by ``LR_decay = (LR_fin/LR_start)**(1./num_epochs)`` at the end of every epoch
    as in Courbariaux et al.'s ``Train-time/mnist.py`` (3e-3 → 3e-7 for MNIST); it reaches
    ``lr_end`` when the run ends. ``per_batch`` decays smoothly within epochs instead. Only
    the ratio is used, on every group, so ``lr_start`` must be the optimizer's nominal lr
    (None reads it from the optimizer).
    """
    lr_start = _nominal_lr(optimizer) if lr_start is None else lr_start
    _check_lr(lr_start, "start learning rate")
    _check_lr(lr_end, "final learning rate")
    if epochs < 1:
        raise OnebitError(f"epochs must be at least 1, got {epochs}")
    ratio = lr_end / lr_start
    return LRSchedule(
        optimizer, lambda t: ratio ** (t / epochs), steps_per_epoch=steps_per_epoch, per_batch=per_batch,
        name="exponential",
    )


def cosine_annealing(
    optimizer, epochs: int, *, eta_min: float = 0.0, lr_start: float | None = None, steps_per_epoch: int = 1
) -> LRSchedule:
    """One cosine from the lr down to ``eta_min`` over ``epochs``, updated every batch."""
    lr_start = _nominal_lr(optimizer) if lr_start is None else lr_start
    floor = eta_min / lr_start
    if epochs < 1:
        raise OnebitError(f"epochs must be at least 1, got {epochs}")
    return LRSchedule(
        optimizer, lambda t: _cosine(t, epochs, floor), steps_per_epoch=steps_per_epoch, per_batch=True, name="cosine"
    )


def sgdr_cycle(t: float, t0: float, t_mult: float) -> tuple[float, float]:
    """(time since the last restart, length of the current cycle) at epoch ``t``."""
    start, period = 0.0, float(t0)
    # restarts at t0, t0 + t0·m, ...; a tolerance keeps t = restart exactly from landing just before it
    while t >= start + period - 1e-9 * period:
        start += period
        period *= t_mult
    return t - start, period


def cosine_warm_restarts(
    optimizer,
    t0: float,
    t_mult: float = 2,
    eta_min: float = 0.0,
    *,
    lr_start: float | None = None,
    steps_per_epoch: int = 1,
    epochs: int | None = None,
) -> LRSchedule:
    """SGDR (Loshchilov & Hutter 2017, eq. 5): cosine annealing restarted after ``t0``,
    ``t0·t_mult``, ``t0·t_mult²``, ... epochs, updated every batch (T_cur counts fractional
    epochs, as in the paper). ``eta_min`` is an absolute lr for the nominal lr, applied to
    every group in proportion. With ``epochs`` (the run's length), the lr once the run is
    over is the end of the last cycle rather than a restart, so the last logged lr is the floor.
    """
    if not t0 > 0:
        raise OnebitError(f"SGDR t0 must be positive, got {t0!r}")
    if not t_mult >= 1:
        raise OnebitError(f"SGDR t_mult must be ≥ 1, got {t_mult!r}")
    lr_start = _nominal_lr(optimizer) if lr_start is None else lr_start
    floor = eta_min / lr_start

    def factor(t: float) -> float:
        if epochs is not None and t >= epochs:
            return floor
        t_cur, period = sgdr_cycle(t, t0, t_mult)
        return _cosine(t_cur, period, floor)

    return LRSchedule(optimizer, factor, steps_per_epoch=steps_per_epoch, per_batch=True, name="sgdr")


@SCHEDULERS.register(name="constant")
def _constant(optimizer, *, epochs: int, steps_per_epoch: int, lr_end: float | None = None) -> LRSchedule:
    """Constant learning rate."""
    return constant(optimizer, steps_per_epoch=steps_per_epoch)


@SCHEDULERS.register(name="exponential")
def _exponential(
    optimizer, *, epochs: int, steps_per_epoch: int, lr_end: float | None = None, per_batch: bool = False
) -> LRSchedule:
    """Exponential decay per epoch to lr_end (default lr·1e-4, BinaryNet's 3e-3 → 3e-7)."""
    lr_start = _nominal_lr(optimizer)
    return exponential_decay(
        optimizer, lr_start, lr_start * 1e-4 if lr_end is None else lr_end, epochs,
        steps_per_epoch=steps_per_epoch, per_batch=per_batch,
    )


@SCHEDULERS.register(name="cosine")
def _cosine_schedule(optimizer, *, epochs: int, steps_per_epoch: int, lr_end: float | None = None) -> LRSchedule:
    """Cosine annealing over the run, per batch, to lr_end (default 0)."""
    return cosine_annealing(optimizer, epochs, eta_min=lr_end or 0.0, steps_per_epoch=steps_per_epoch)


@SCHEDULERS.register(name="sgdr")
def _sgdr(
    optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr_end: float | None = None,
    t0: float | None = None,
    t_mult: float = 2,
    eta_min: float | None = None,
    cycles: int = 3,
) -> LRSchedule:
    """Cosine with warm restarts (SGDR), period doubling; t0 fits `cycles` cycles into the run."""
    if not (isinstance(cycles, int) and cycles >= 1):
        raise OnebitError(f"SGDR cycles must be an integer ≥ 1, got {cycles!r}")
    if t0 is None:  # the run ends exactly at the end of the cycles-th cycle
        t0 = epochs / cycles if t_mult == 1 else epochs * (t_mult - 1) / (t_mult**cycles - 1)
    floor = eta_min if eta_min is not None else (lr_end or 0.0)
    return cosine_warm_restarts(optimizer, t0, t_mult, floor, steps_per_epoch=steps_per_epoch, epochs=epochs)


def build_scheduler(optimizer, name: str, epochs: int, steps_per_epoch: int, **kwargs) -> LRSchedule:
    """The schedule ``name`` (``"constant"``, ``"exponential"``, ``"cosine"``, ``"sgdr"``) for a run
    of ``epochs`` epochs of ``steps_per_epoch`` batches.

    ``lr_end`` (may be None) is the final lr of ``exponential`` (default lr·1e-4) and
    ``cosine`` (default 0) and SGDR's floor; ``sgdr`` also takes ``t0`` (epochs; default: 3
    cycles fill the run), ``t_mult`` (2) and ``eta_min``; ``exponential`` takes ``per_batch``.
    """
    factory = SCHEDULERS.get(name)
    if epochs < 1:
        raise OnebitError(f"epochs must be at least 1, got {epochs}")
    _check_options("scheduler", name, factory, kwargs, fixed=("epochs", "steps_per_epoch"))
    return factory(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)
