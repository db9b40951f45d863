"""Training settings for seconds-long test runs, shared by the test modules."""
from __future__ import annotations

from onebit.train import TrainConfig


def digits_config(out, model: str = "binarynet_mlp", **overrides) -> TrainConfig:
    """A small MLP on sklearn's digits for two epochs, one thread, no progress bar; ``overrides``
    are TrainConfig fields."""
    settings = dict(model=model, dataset="digits", model_kwargs={"hidden": 64, "depth": 1}, epochs=2,
                    batch_size=64, lr=1e-2, out=str(out), progress=False, threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)
