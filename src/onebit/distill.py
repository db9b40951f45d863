"""Knowledge distillation: a trained network (the *teacher*, usually full precision) guides a
binary *student* with its softened outputs (Hinton et al. 2015; used for BNNs by Real-to-Binary
Nets, Martinez et al. 2020, and ReActNet, Liu et al. 2020).

The student's loss becomes ``(1 − w) · task loss + w · distillation_loss(student, teacher, T)``
(:func:`onebit.losses.distillation_loss`), with ``w`` = ``distill_weight`` and ``T`` =
``distill_temperature``. From the command line::

    onebit train float_cnn -d fashion_mnist --out runs/teacher
    onebit train binarynet_mlp -d fashion_mnist --teacher runs/teacher/best.pt \\
        --distill-weight 0.5 --distill-temperature 4

The teacher is any checkpoint written by ``onebit train`` whose input shape and class count
match the student's dataset; it runs in eval mode, without gradients. When the training images
are not augmented a sample's teacher output never changes, so the training loop has the
teacher :meth:`~Teacher.remember` the whole training set once, in a fixed order and batching
(an interrupted and resumed run then sees exactly the same outputs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .data import ArrayDataset, BatchLoader
from .errors import CheckpointError

__all__ = ["Teacher"]


class Teacher:
    """A trained network loaded from an ``onebit train`` checkpoint, answering logits for batches.

    ``in_shape`` and ``num_classes`` are the student's; a teacher trained for other inputs or
    classes is refused.
    """

    def __init__(self, checkpoint: str | Path, in_shape: tuple[int, ...], num_classes: int,
                 device: torch.device | str = "cpu") -> None:
        from .train import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(checkpoint)
        kwargs = state["model_kwargs"]
        theirs = (tuple(kwargs.get("in_shape", ())), kwargs.get("num_classes"))
        if theirs != (tuple(in_shape), num_classes):
            raise CheckpointError(
                f"teacher {checkpoint} takes inputs {theirs[0]} with {theirs[1]} classes; "
                f"the student's dataset has inputs {tuple(in_shape)} with {num_classes} classes"
            )
        self.name = state["model_name"]
        self.device = torch.device(device)
        self.model = model_from_checkpoint(state).to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._remembered: Tensor | None = None

    @torch.no_grad()
    def remember(self, dataset: ArrayDataset, batch_size: int = 500, progress: bool = False) -> None:
        """Compute and keep the logits of every sample of ``dataset`` (un-augmented), so that
        :meth:`logits` with ``indices`` into it is a lookup."""
        loader = BatchLoader(dataset, batch_size)
        outputs = [self.model(x.to(self.device)).float().cpu()
                   for x, _ in tqdm(loader, desc=f"teacher {self.name}", disable=not progress, leave=False)]
        self._remembered = torch.cat(outputs) if outputs else torch.empty(0)

    @torch.no_grad()
    def logits(self, x: Tensor, indices: Tensor | None = None) -> Tensor:
        """The teacher's logits for the batch ``x``: looked up by ``indices`` (positions in the
        remembered dataset) after :meth:`remember`, computed otherwise."""
        if self._remembered is None or indices is None:
            return self.model(x).float()
        return self._remembered[indices.cpu()].to(x.device)
