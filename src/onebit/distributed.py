"""Data-parallel training with PyTorch DDP, launched by ``torchrun``; device selection.

One machine, N processes (gloo on CPU, NCCL on GPUs)::

    onebit train binarynet_mlp -d fashion_mnist --nproc 2          # starts torchrun for you
    torchrun --standalone --nproc-per-node 2 -m onebit train binarynet_mlp -d fashion_mnist

Several machines: run the same ``torchrun`` on each with ``--nnodes``, ``--node-rank`` and a
rendezvous endpoint (README, "Scaling out"). :func:`train <onebit.train.train>` reads the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables torchrun sets; there is no onebit launcher
beyond handing the command line to torchrun.

Semantics: ``batch_size`` is per process, so N processes with batch B step like one process
with batch N·B (gradients are averaged by DDP; every rank reads a disjoint slice of the same
shuffled order, see :class:`onebit.data.BatchLoader`). Batch norm statistics are per process
unless ``sync_bn``: then every BatchNorm layer normalises with the statistics of the global
batch — :class:`GlobalBatchNorm` all-reduces sums (works on CPU/gloo, where
``torch.nn.SyncBatchNorm`` refuses to run), ``torch.nn.SyncBatchNorm`` is used on CUDA.
Only rank 0 writes checkpoints, logs and progress bars. Collectives time out after
``ONEBIT_DIST_TIMEOUT`` seconds (default 300), so a job whose rank died fails instead of hanging
(torchrun also stops the surviving ranks when one exits with an error).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = ["DistContext", "GlobalBatchNorm", "launch", "resolve_device", "setup", "sync_batch_norm"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    return torch.device(name)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: all ranks must call it)."""
        if not self.distributed:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(value)
        return int(value) == 0

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (a collective)."""
        return not self.all_true(not flag)

    def same_on_all_ranks(self, model: nn.Module) -> bool:
        """Whether every rank holds the same parameters (compares a float64 checksum per rank)."""
        if not self.distributed:
            return True
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world_size)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def close(self, wait_for_others: bool = True) -> None:
        """Leave the process group; ``wait_for_others`` first waits until every rank gets here
        (gloo aborts a rank whose peer tears its connections down mid-use). A rank that
        failed must not wait: it exits, and torchrun stops the others."""
        if self.distributed and dist.is_initialized():
            if wait_for_others:
                dist.barrier()
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if ``WORLD_SIZE`` > 1) and pick the device.

    With CUDA each process takes GPU ``LOCAL_RANK``.
    """
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    resolved = resolve_device(device)
    if world_size <= 1:
        return DistContext(device=resolved)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=_env_int("ONEBIT_DIST_TIMEOUT", 300))
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo", timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, device=resolved)


class GlobalBatchNorm(nn.BatchNorm1d):
    """Batch norm over the global batch of all ranks, on any device: sums are all-reduced.

    Training mode normalises with mean and biased variance of the union of all ranks'
    batches and updates the running statistics with its unbiased variance, exactly like one
    ``nn.BatchNorm*d`` on the concatenated batch (up to float rounding: the variance is
    E[x²] − E[x]², accumulated in float64). Gradients flow through the all-reduce
    (``torch.distributed.nn.functional.all_reduce``). Eval mode and single-process runs are
    plain batch norm. Accepts (N, C) and (N, C, *spatial) inputs (a BatchNorm1d that also
    takes images, so it can stand in for BatchNorm1d/2d/3d with the same state dict).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.double()
        count = torch.tensor([input.numel() / input.shape[1]], dtype=torch.float64, device=input.device)
        stats = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
        stats = all_reduce(stats)
        n, channels = stats[0], input.shape[1]
        mean = stats[1 : 1 + channels] / n
        var = (stats[1 + channels :] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        out = out.to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer by one over the global batch (same parameters and buffers)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, _BATCH_NORMS) and not isinstance(module, GlobalBatchNorm):
            new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def launch(nproc: int, train_argv: list[str]) -> int:
    """Run ``onebit train`` with ``train_argv`` in ``nproc`` local processes under torchrun; its exit code."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "onebit", "train", *train_argv]
    return subprocess.run(command).returncode
