"""Losses for classifiers, registered by name in :data:`LOSSES`.

``square_hinge`` is BinaryNet's multi-class L2-SVM (squared hinge) loss; ``cross_entropy`` is
the usual softmax cross-entropy. Both take logits ``(N, C)`` and integer class labels ``(N,)``::

    from onebit.losses import get_loss
    loss_fn = get_loss("square_hinge")
    loss = loss_fn(model(x), y)

:func:`distillation_loss` compares a student's logits with a teacher's (knowledge distillation,
used with ``onebit train --teacher CHECKPOINT``; see :mod:`onebit.distill`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import OnebitError, ShapeError
from .registry import Registry

__all__ = ["LOSSES", "SquareHingeLoss", "distillation_loss", "get_loss", "square_hinge_loss"]

LOSSES = Registry("loss")


def _signed_targets(logits: Tensor, target: Tensor) -> Tensor:
    """±1 targets shaped like ``logits``: +1 for the true class, −1 for every other class."""
    if logits.ndim != 2:
        raise ShapeError(f"square hinge loss needs logits of shape (N, C), got {tuple(logits.shape)}")
    if target.ndim == 1 and not target.is_floating_point():
        if target.shape[0] != logits.shape[0]:
            raise ShapeError(f"{target.shape[0]} labels for a batch of {logits.shape[0]} logits")
        signed = torch.full_like(logits, -1.0)
        return signed.scatter_(1, target.long().unsqueeze(1), 1.0)
    if target.shape != logits.shape:
        raise ShapeError(
            f"square hinge targets must be class labels (N,) or ±1 of the logits' shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    return target.to(logits.dtype)


def square_hinge_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BinaryNet's multi-class squared hinge (L2-SVM) loss, ``mean(max(0, 1 − t·y)²)``.

    ``t`` is the one-hot target mapped to ±1 (+1 for the true class, −1 elsewhere) and the
    mean runs over *all* N·C elements, batch and classes alike, exactly as in Courbariaux et
    al.'s Theano code (``Train-time/mnist.py``)::

        loss = T.mean(T.sqr(T.maximum(0., 1. - target * train_output)))

    (Summing over classes instead would multiply the loss, and with Adam almost nothing
    else, by C.) ``target`` is either integer labels of shape (N,) or a float tensor of
    ±1 values shaped like ``logits``.
    """
    signed = _signed_targets(logits, target)
    return torch.clamp_min(1.0 - signed * logits, 0.0).square().mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton et al.'s (2015) knowledge-distillation loss, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``
    averaged over the batch.

    The ``T²`` keeps the gradient's scale independent of the temperature: the gradient with
    respect to the student's logits is ``T · (softmax(s/T) − softmax(t/T)) / N``. No gradient
    flows into ``teacher_logits``.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ShapeError(f"distillation needs student and teacher logits of one shape (N, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise OnebitError(f"distillation temperature must be positive, got {temperature}")
    student = torch.log_softmax(student_logits / temperature, dim=1)
    teacher = torch.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return temperature**2 * nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)


class SquareHingeLoss(nn.Module):
    """Module form of :func:`square_hinge_loss`."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return square_hinge_loss(logits, target)


@LOSSES.register
def square_hinge() -> nn.Module:
    """Multi-class squared hinge (L2-SVM), mean over batch and classes (BinaryNet)."""
    return SquareHingeLoss()


@LOSSES.register
def cross_entropy() -> nn.Module:
    """Softmax cross-entropy on the logits, mean over the batch."""
    return nn.CrossEntropyLoss()


def get_loss(name: str) -> nn.Module:
    """The loss module registered as ``name``; an unknown name raises
    :class:`onebit.errors.UnknownNameError` listing the valid ones."""
    return LOSSES.create(name)
