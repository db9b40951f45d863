#!/usr/bin/env python
"""The deployment benchmark, onebit engine against PyTorch float32: a script around :mod:`onebit.bench`.

    python benchmarks/bench_engine.py --threads 2 --json bench.json --plot bench.png
    python benchmarks/bench_engine.py --quick

Same options and output as ``python -m onebit bench``; cases, definitions and measured
figures are in docs/benchmarks.md. Runs from a source checkout (``src/`` is put first on the
path, the native extension built in place) as well as from an installed onebit.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from onebit.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
