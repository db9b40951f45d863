"""Time one training step of binary networks against their float twins, in the same run.

    python benchmarks/train_step.py --threads 2 --json train_step.json

A step is zero_grad → forward → loss → backward → optimizer step → latent-weight clipping,
the exact sequence :func:`onebit.train.train` runs. The ratio binary/float is the figure of
merit (goal: ≤ 1.3): the straight-through estimator should cost little over float training.
Networks with convolutions are timed in both memory layouts, NCHW (``contiguous``) and NHWC
(``channels_last``, what :func:`onebit.train.train` uses on a CPU), to show what NHWC buys.

The variants of one network (float and binary, in each layout) take their steps in turns,
one step each per round, so that a machine whose speed drifts during the run (a shared VM,
turbo, another process) slows them alike instead of biasing whichever ran last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from onebit.layers import clip_latent_weights
from onebit.losses import get_loss
from onebit.models import create_model
from onebit.optim import build_optimizer
from onebit.train import training_memory_format

CASES = [
    # (label, binary model, float twin, kwargs, input shape, batch)
    ("binarynet_mlp 784-3x4096-10", "binarynet_mlp", "float_mlp", {}, (1, 28, 28), 100),
    ("binarynet_cnn width 0.5, 32x32", "binarynet_cnn", "float_cnn", {"width": 0.5}, (3, 32, 32), 50),
    ("wrn_1bit WRN-8-4, 28x28", "wrn_1bit", "float_wrn", {"depth": 8, "width": 4}, (1, 28, 28), 128),
]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def training_step(model_name: str, kwargs: dict, in_shape: tuple, batch: int, layout: torch.memory_format):
    """A function that runs one training step of a fresh ``model_name`` and returns its seconds."""
    torch.manual_seed(0)
    model = create_model(model_name, in_shape=in_shape, **kwargs).train().to(memory_format=layout)
    optimizer = build_optimizer(model, "adam", 1e-3)
    loss_fn = get_loss("cross_entropy")
    x = torch.randn(batch, *in_shape)
    y = torch.randint(0, 10, (batch,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps, variants in turns")
    print(f"{'network':34s} {'layout':14s} {'batch':>5s} {'float ms':>9s} {'binary ms':>10s} {'ratio':>6s}")
    for label, binary, floating, kwargs, in_shape, batch in CASES:
        nhwc = training_memory_format(create_model(binary, in_shape=in_shape, **kwargs), torch.device("cpu"))
        layouts = list(LAYOUTS) if nhwc == torch.channels_last else ["contiguous"]
        steps = {(kind, layout): training_step(name, kwargs, in_shape, batch, LAYOUTS[layout])
                 for layout in layouts for kind, name in (("float", floating), ("binary", binary))}
        times = {key: [] for key in steps}
        for i in range(args.warmup + args.repeats):
            for key, step in steps.items():
                seconds = step()
                if i >= args.warmup:
                    times[key].append(seconds)
        for layout in layouts:
            f, b = (statistics.median(times[kind, layout]) for kind in ("float", "binary"))
            rows.append({"network": label, "layout": layout, "batch": batch, "float_s": f, "binary_s": b,
                         "ratio": b / f})
            print(f"{label:34s} {layout:14s} {batch:5d} {1e3 * f:9.1f} {1e3 * b:10.1f} {b / f:6.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
