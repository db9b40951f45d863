#!/usr/bin/env python
"""Training throughput with 1 and 2 data-parallel processes (torchrun, gloo) on this machine.

    python benchmarks/ddp_scaling.py --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist \
        --json docs/ddp_scaling.json

Each configuration trains ``binarynet_mlp`` (``--hidden``) for one epoch with one torch thread
per process and the same global batch (``--batch-size`` split over the processes); the
throughput is training samples per second of that epoch as the run's own ``metrics.jsonl``
records it (data loading and evaluation excluded). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(processes: int, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "onebit", "train", "binarynet_mlp", "-m", f"hidden={args.hidden}",
               "--dataset", args.dataset, "--epochs", "1", "--threads", "1", "--quiet",
               "--batch-size", str(args.batch_size // processes), "--out", str(out)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if processes > 1:
        command += ["--nproc", str(processes), "--sync-bn"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"processes": processes, "epoch_seconds": row["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from onebit.data import load_dataset, split_validation

    train_samples = len(split_validation(load_dataset(args.dataset, "train", data_dir=args.data_dir), 0.1, seed=0)[0].labels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            row = run(processes, args, Path(tmp) / f"p{processes}")
            row["samples_per_second"] = train_samples / row["epoch_seconds"]
            rows.append(row)
    base = rows[0]["samples_per_second"]
    print(f"binarynet_mlp hidden={args.hidden} on {args.dataset}, global batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| processes | epoch seconds | samples/s | speedup |\n|---|---|---|---|")
    for row in rows:
        row["speedup"] = row["samples_per_second"] / base
        print(f"| {row['processes']} | {row['epoch_seconds']:.1f} | {row['samples_per_second']:.0f} | {row['speedup']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
