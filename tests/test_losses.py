"""Losses: BinaryNet's squared hinge (analytic values, gradient, margins), distillation, and the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onebit.errors import OnebitError, ShapeError, UnknownNameError
from onebit.losses import LOSSES, SquareHingeLoss, distillation_loss, get_loss, square_hinge_loss


def test_square_hinge_analytic_value():
    logits = torch.tensor([[2.0, -0.5, 0.3]])
    # t = (+1, −1, −1): 1 − t·y = (−1, 0.5, 1.3) → max(0, ·)² = (0, 0.25, 1.69), mean over all 3
    loss = square_hinge_loss(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx((0.0 + 0.25 + 1.69) / 3)


def test_square_hinge_is_mean_over_batch_and_classes():
    logits = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    labels = torch.tensor([1, 0])
    # sample 1: t = (−1, +1): (1, 1)² → 1, 1;  sample 2: t = (+1, −1): (−2 → 0, 0 → 0)
    assert square_hinge_loss(logits, labels).item() == pytest.approx(2.0 / 4)


def test_signed_targets_equal_labels():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    signed = 2 * F.one_hot(labels, 4).float() - 1
    assert torch.equal(square_hinge_loss(logits, labels), square_hinge_loss(logits, signed))


def test_square_hinge_matches_binarynet_theano_formula():
    torch.manual_seed(1)
    logits = torch.randn(5, 10) * 2
    labels = torch.randint(0, 10, (5,))
    target = 2 * F.one_hot(labels, 10).float() - 1
    expected = torch.mean(torch.square(torch.maximum(torch.tensor(0.0), 1.0 - target * logits)))
    assert torch.allclose(square_hinge_loss(logits, labels), expected)


def test_square_hinge_gradient():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, requires_grad=True)
    labels = torch.tensor([4, 0, 2])
    square_hinge_loss(logits, labels).backward()
    t = 2 * F.one_hot(labels, 5).float() - 1
    expected = -2 * t * torch.clamp_min(1 - t * logits.detach(), 0) / logits.numel()
    assert torch.allclose(logits.grad, expected)


def test_perfect_margin_gives_zero_loss_and_gradient():
    labels = torch.tensor([2, 0, 1])
    t = 2 * F.one_hot(labels, 3).float() - 1
    logits = (1.5 * t).requires_grad_()
    loss = square_hinge_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0
    # exactly on the margin (t·y = 1) is also zero
    assert square_hinge_loss(t.clone(), labels).item() == 0.0


def test_module_and_registry():
    assert isinstance(get_loss("square_hinge"), SquareHingeLoss)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.equal(get_loss("square_hinge")(logits, labels), square_hinge_loss(logits, labels))
    assert torch.allclose(get_loss("cross_entropy")(logits, labels), F.cross_entropy(logits, labels))
    assert set(LOSSES.names()) >= {"square_hinge", "cross_entropy"}
    for name in LOSSES:
        assert LOSSES.describe(name)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(UnknownNameError, match="cross_entropy.*square_hinge"):
        get_loss("hinge")


def test_shape_errors():
    with pytest.raises(ShapeError):
        square_hinge_loss(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ShapeError):
        square_hinge_loss(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ShapeError):
        square_hinge_loss(torch.randn(4, 3), torch.ones(4, 2))


def test_distillation_loss_value_and_gradient():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]], requires_grad=True)
    temperature = 2.0
    loss = distillation_loss(student, teacher, temperature)
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    expected = temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # d/ds of T²·KL(p_t ‖ p_s) averaged over N rows: T·(p_s − p_t)/N
    assert torch.allclose(student.grad, temperature * (p_s - p_t).detach() / 2, atol=1e-6)
    assert teacher.grad is None  # the teacher is a target, not trained


def test_distillation_loss_is_zero_for_a_copy_of_the_teacher():
    logits = torch.randn(5, 4, requires_grad=True)
    loss = distillation_loss(logits, logits.detach().clone(), temperature=4.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logits.grad.abs().max() < 1e-6


def test_distillation_loss_bad_input():
    with pytest.raises(ShapeError, match="one shape"):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(OnebitError, match="temperature must be positive"):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)
