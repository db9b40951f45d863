"""Optimizers and schedules: BinaryNet's LR scale, parameter groups, Bop, checkpointable state."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from onebit.errors import OnebitError, UnknownNameError
from onebit.layers import QuantConv2d, QuantLinear
from onebit.optim import (
    Bop,
    CombinedOptimizer,
    binarynet_lr_scale,
    binarynet_lr_scales,
    build_optimizer,
    build_scheduler,
    cosine_warm_restarts,
    exponential_decay,
    sgdr_cycle,
)


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        QuantConv2d(1, 4, 3, padding=1, bias=False, weight_quantizer="sign", weight_clip=1.0),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        QuantLinear(4 * 6 * 6, 8, bias=False, input_quantizer="sign", weight_quantizer="sign", weight_clip=1.0),
        nn.BatchNorm1d(8),
        QuantLinear(8, 3, bias=True, input_quantizer="kbit", weight_quantizer="kbit"),  # 2-bit: not binary
    )


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


# --------------------------------------------------------------------------- LR scale
def test_lr_scale_formula_dense_and_conv():
    # BinaryNet: W_LR_scale = 1 / sqrt(1.5 / (num_inputs + num_units))
    dense = QuantLinear(784, 4096, weight_quantizer="sign")
    assert binarynet_lr_scale(dense.weight) == pytest.approx(1 / math.sqrt(1.5 / (784 + 4096)))
    assert binarynet_lr_scale(dense.weight) == pytest.approx(57.0380, abs=1e-4)
    # conv: num_inputs = kh·kw·in_channels, num_units = kh·kw·num_filters
    conv = QuantConv2d(128, 256, 3, weight_quantizer="sign")
    assert binarynet_lr_scale(conv.weight) == pytest.approx(math.sqrt((9 * 128 + 9 * 256) / 1.5))


def test_lr_scales_cover_exactly_the_binary_layers():
    scales = binarynet_lr_scales(small_model())
    assert list(scales) == ["0.weight", "3.weight"]  # the 2-bit layer is not binary
    assert scales["0.weight"] == pytest.approx(math.sqrt((9 * 1 + 9 * 4) / 1.5))
    assert scales["3.weight"] == pytest.approx(math.sqrt((144 + 8) / 1.5))


# --------------------------------------------------------------------------- groups
def test_param_groups_with_scaling_and_decay():
    model = small_model()
    opt = build_optimizer(model, "adam", 1e-3, weight_decay=1e-4, lr_scaling=True)
    assert isinstance(opt, torch.optim.Adam)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "0.weight", "3.weight"]
    groups = {g["name"]: g for g in opt.param_groups}
    scales = binarynet_lr_scales(model)
    for name, scale in scales.items():
        assert groups[name]["lr"] == pytest.approx(1e-3 * scale)
        assert groups[name]["lr_scale"] == pytest.approx(scale)
        assert groups[name]["weight_decay"] == 1e-4
    assert groups["decay"]["params"] == [model[5].weight] and groups["decay"]["weight_decay"] == 1e-4
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert no_decay == {id(p) for p in (*model[1].parameters(), *model[4].parameters(), model[5].bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["base_lr"] == 1e-3 for g in opt.param_groups)
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each exactly once


def test_param_groups_without_scaling_is_one_group():
    model = small_model()
    for name in ("adam", "sgd"):
        opt = build_optimizer(model, name, 0.1)
        assert [g["name"] for g in opt.param_groups] == ["default"]
        assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0
    assert build_optimizer(model, "sgd", 0.1, momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert build_optimizer(model, "sgd", 0.1, nesterov=True).param_groups[0]["nesterov"] is True


def test_adam_uses_the_fused_kernel_on_cpu():
    opt = build_optimizer(small_model(), "adam", 1e-3)
    assert opt.param_groups[0]["fused"] is True


def test_unknown_optimizer_and_bad_settings():
    with pytest.raises(UnknownNameError, match="adam, bop, sgd"):
        build_optimizer(small_model(), "lamb", 1e-3)
    with pytest.raises(OnebitError, match="learning rate"):
        build_optimizer(small_model(), "adam", -1.0)
    with pytest.raises(OnebitError, match="binary weights"):
        build_optimizer(nn.Sequential(nn.Linear(3, 2)), "bop", 1e-3)
    with pytest.raises(OnebitError, match="'adam' does not take 'momentum'; its options: none"):
        build_optimizer(small_model(), "adam", 1e-3, momentum=0.9)
    with pytest.raises(OnebitError, match="'bop' does not take 'lr_end'; its options: threshold, gamma"):
        build_optimizer(small_model(), "bop", 1e-3, lr_end=0.1)
    with pytest.raises(OnebitError, match="momentum must be in"):
        build_optimizer(small_model(), "sgd", 0.1, momentum=1.0)
    with pytest.raises(OnebitError, match="Nesterov"):
        build_optimizer(small_model(), "sgd", 0.1, momentum=0.0, nesterov=True)


def test_training_step_follows_scaled_lr():
    """With lr_scaling, Adam's first step moves a binary weight by lr·scale (sign of grad)."""
    model = small_model()
    before = model[3].weight.detach().clone()
    opt = build_optimizer(model, "adam", 1e-4, lr_scaling=True)
    set_grads(model, 0)
    opt.step()
    step = (model[3].weight.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-4 * binarynet_lr_scales(model)["3.weight"]), rtol=1e-3)


# --------------------------------------------------------------------------- Bop
def test_bop_initialises_to_signs():
    w = nn.Parameter(torch.tensor([0.3, -0.2, 0.0, -0.0]))
    Bop([w])
    assert w.tolist() == [1.0, -1.0, 1.0, 1.0]


def test_bop_flips_exactly_where_momentum_exceeds_threshold_with_agreeing_sign():
    w = nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]))
    opt = Bop([w], threshold=0.1, gamma=0.5)
    w.grad = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.1, -0.1])
    opt.step()
    # m = 0.5·g = (.5, .5, −.5, −.5, .05, −.05): flips at 0 (m>0, w>0) and 3 (m<0, w<0);
    # 1 and 2 disagree in sign, 4 and 5 are below τ
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
    assert torch.allclose(opt.state[w]["momentum"], torch.tensor([0.5, 0.5, -0.5, -0.5, 0.05, -0.05]))
    # the same gradient again: m = 0.5·m + 0.5·g = 1.5·(first m); every weight now agrees with −g
    opt.step()
    assert torch.allclose(opt.state[w]["momentum"], torch.tensor([0.75, 0.75, -0.75, -0.75, 0.075, -0.075]))
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
    # reversed gradients flip 0..3; 4 and 5 keep their gradient and cross τ: m = ±(0.0375 + 0.15)
    w.grad = torch.tensor([-3.0, -3.0, 3.0, 3.0, 0.3, -0.3])
    opt.step()
    assert torch.allclose(opt.state[w]["momentum"], torch.tensor([-1.125, -1.125, 1.125, 1.125, 0.1875, -0.1875]))
    assert w.tolist() == [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    assert set(w.unique().tolist()) <= {-1.0, 1.0}


def test_bop_skips_parameters_without_grad():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = Bop([w], threshold=0.0, gamma=1.0)
    opt.step()
    assert w.tolist() == [1.0, -1.0] and not opt.state


def test_bop_optimizer_combines_bop_and_adam():
    model = small_model()
    opt = build_optimizer(model, "bop", 1e-3, threshold=1e-6, gamma=1e-2)
    assert isinstance(opt, CombinedOptimizer)
    assert list(opt.optimizers) == ["adam", "bop"]
    binary = {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in opt.optimizers["bop"].param_groups[0]["params"]} == binary
    adam_params = {id(p) for g in opt.optimizers["adam"].param_groups for p in g["params"]}
    assert adam_params == {id(p) for p in model.parameters()} - binary
    assert opt.param_groups[0]["lr"] == 1e-3  # Adam first: the nominal lr is group 0's
    assert opt.param_groups[-1]["lr"] == 1e-2  # Bop's γ
    assert set(model[0].weight.unique().tolist()) <= {-1.0, 1.0}
    set_grads(model, 1)
    opt.step()
    for layer in (model[0], model[3]):
        assert set(layer.weight.unique().tolist()) <= {-1.0, 1.0}
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_combined_state_dict_round_trip():
    model = small_model()
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, "bop", 1e-3, threshold=1e-4, gamma=0.1)
    for seed in range(3):
        set_grads(model, seed)
        opt.step()
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, "bop", 1e-3, threshold=1e-4, gamma=0.1)
    twin_opt.load_state_dict(roundtrip(opt.state_dict()))
    for seed in range(3, 6):
        set_grads(model, seed)
        set_grads(twin, seed)
        opt.step()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(OnebitError):
        twin_opt.load_state_dict({"adam": opt.state_dict()["adam"]})


def test_bop_learns_a_sign_problem():
    """Bop alone recovers the signs of a teacher's ±1 weights from a regression loss."""
    torch.manual_seed(0)
    teacher = torch.where(torch.rand(16) > 0.5, 1.0, -1.0)
    w = nn.Parameter(torch.randn(16))
    opt = Bop([w], threshold=1e-3, gamma=0.05)
    for _ in range(200):
        x = torch.randn(64, 16)
        loss = ((x @ w - x @ teacher) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(w.detach(), teacher)


# --------------------------------------------------------------------------- schedules
def test_exponential_endpoints_binarynet():
    model = small_model()
    opt = build_optimizer(model, "adam", 3e-3, lr_scaling=True)
    sched = build_scheduler(opt, "exponential", epochs=10, steps_per_epoch=5, lr_end=3e-7)
    ratios = [g["lr"] / g["lr_scale"] for g in opt.param_groups]
    assert ratios == pytest.approx([3e-3] * len(ratios))
    for _ in range(5):
        sched.step_batch()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3)  # per-epoch decay, not per batch
    sched.step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * (1e-4) ** 0.1)
    for _ in range(9):
        sched.step_epoch()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(3e-7 * g["lr_scale"])  # ratios kept


def test_exponential_default_end_and_function_form():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = build_scheduler(opt, "exponential", epochs=4, steps_per_epoch=1, lr_end=None)
    for _ in range(4):
        sched.step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-7)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = exponential_decay(opt, 1.0, 0.01, 2, steps_per_epoch=2, per_batch=True)
    sched.step_batch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01**0.25)


def test_sgdr_restarts_with_period_doubling():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_warm_restarts(opt, t0=1, t_mult=2, eta_min=0.0, steps_per_epoch=4)
    lrs = [opt.param_groups[0]["lr"]]
    for epoch in range(7):
        for batch in range(4):
            sched.step_batch()
            if batch < 3:
                lrs.append(opt.param_groups[0]["lr"])
        sched.step_epoch()
        lrs.append(opt.param_groups[0]["lr"])
    # lrs[i] is the lr at t = i/4 epochs; restarts (lr = 1) at t = 0, 1, 3, 7
    for t in (0, 1, 3, 7):
        assert lrs[4 * t] == pytest.approx(1.0), t
    assert lrs[2] == pytest.approx(0.5)  # mid first cycle (length 1)
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lrs[8] == pytest.approx(0.5)  # t = 2: mid second cycle (length 2)
    assert lrs[20] == pytest.approx(0.5)  # t = 5: mid third cycle (length 4)
    assert lrs[27] == pytest.approx(0.5 * (1 + math.cos(15 / 16 * math.pi)))  # just before the restart at 7
    assert sgdr_cycle(6.0, 1, 2) == (3.0, 4.0)


def test_sgdr_default_fits_three_cycles_and_cosine_ends_at_floor():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, "sgdr", epochs=7, steps_per_epoch=2, lr_end=0.001)
    lrs = []
    for _ in range(7):
        sched.step_epoch()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[2] == pytest.approx(0.1)  # restarts after epochs 1 and 3
    assert lrs[6] == pytest.approx(0.001)  # the run ends at the end of the third cycle, not at a restart
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, "cosine", epochs=3, steps_per_epoch=2, lr_end=0.001)
    for _ in range(3):
        sched.step_batch()
        sched.step_batch()
        sched.step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_scheduler_state_round_trip_and_resume():
    def make():
        model = small_model()
        opt = build_optimizer(model, "adam", 1e-2, lr_scaling=True)
        return opt, build_scheduler(opt, "sgdr", epochs=6, steps_per_epoch=4, t0=1)

    opt, sched = make()
    for _ in range(13):
        sched.step_batch()
        if sched.batch == 4:
            sched.step_epoch()
    state = roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    opt2, sched2 = make()
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    for _ in range(5):
        sched.step_batch()
        sched2.step_batch()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    with pytest.raises(OnebitError):
        build_scheduler(opt2, "constant", epochs=1, steps_per_epoch=1).load_state_dict(state["sched"])


def test_constant_and_unknown_schedulers():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_scheduler(opt, "constant", epochs=3, steps_per_epoch=2, lr_end=None)
    sched.step_batch()
    sched.step_epoch()
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(UnknownNameError, match="constant, cosine, exponential, sgdr"):
        build_scheduler(opt, "step", epochs=3, steps_per_epoch=2)
    with pytest.raises(OnebitError, match="t0"):
        build_scheduler(opt, "cosine", epochs=3, steps_per_epoch=2, t0=3)


def test_scheduler_scales_bop_gamma_with_the_lr():
    model = small_model()
    opt = build_optimizer(model, "bop", 1e-3, gamma=1e-4)
    build_scheduler(opt, "exponential", epochs=2, steps_per_epoch=1, lr_end=1e-5).step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert opt.optimizers["bop"].param_groups[0]["lr"] == pytest.approx(1e-5)
