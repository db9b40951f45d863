"""onebit: train binarized neural networks in PyTorch and run them with XNOR/popcount kernels.

This top-level module imports nothing heavy, so that ``onebit.engine`` runs without torch.
Import the parts you need: ``onebit.quantizers``, ``onebit.layers``, ``onebit.models``,
``onebit.data``, ``onebit.train``, ``onebit.export``, ``onebit.engine``.
"""
from .errors import CheckpointError, DataError, FormatError, OnebitError, ShapeError, UnknownNameError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "FormatError",
    "OnebitError",
    "ShapeError",
    "UnknownNameError",
    "__version__",
]
