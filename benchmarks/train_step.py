"""Time one training step of binary networks against their float twins, in the same run.

    python benchmarks/train_step.py --threads 2 --json train_step.json

A step is zero_grad → forward → loss → backward → optimizer step → latent-weight clipping,
the exact sequence :func:`onebit.train.train` runs. The ratio binary/float is the figure of
merit (goal: ≤ 1.3): the straight-through estimator should cost little over float training.
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

CASES = [
    # (label, binary model, float twin, kwargs, input shape, batch)
    ("binarynet_mlp 784-3x4096-10", "binarynet_mlp", "float_mlp", {}, (1, 28, 28), 100),
    ("binarynet_cnn width 0.5, 32x32", "binarynet_cnn", "float_cnn", {"width": 0.5}, (3, 32, 32), 50),
]


def step_seconds(model_name: str, kwargs: dict, in_shape: tuple, batch: int, repeats: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, in_shape=in_shape, **kwargs).train()
    optimizer = build_optimizer(model, "adam", 1e-3)
    loss_fn = get_loss("cross_entropy")
    x = torch.randn(batch, *in_shape)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps")
    print(f"{'network':34s} {'batch':>5s} {'float ms':>9s} {'binary ms':>10s} {'ratio':>6s}")
    for label, binary, floating, kwargs, in_shape, batch in CASES:
        f = step_seconds(floating, kwargs, in_shape, batch, args.repeats, args.warmup)
        b = step_seconds(binary, kwargs, in_shape, batch, args.repeats, args.warmup)
        rows.append({"network": label, "batch": batch, "float_s": f, "binary_s": b, "ratio": b / f})
        print(f"{label:34s} {batch:5d} {1e3 * f:9.1f} {1e3 * b:10.1f} {b / f:6.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
