"""The onebit inference engine: load a ``.onebit`` file and run it with XNOR/popcount kernels.

    from onebit.engine import load
    model = load("model.onebit", threads=None)
    logits = model.predict(x)      # x: float32 [N, *model.input_shape], as the PyTorch model takes it
    labels = model.classify(x)

Needs numpy only: neither this package nor anything it imports imports torch.
"""
from ..errors import FormatError, ShapeError
from .executor import Model, TraceEntry, load
from .format import FORMAT_VERSION, read_model, write_model

__all__ = ["FORMAT_VERSION", "FormatError", "Model", "ShapeError", "TraceEntry", "load", "read_model", "write_model"]
