"""Training settings for seconds-long test runs, and run folders as a kill leaves them; shared by the test modules."""
from __future__ import annotations

from onebit.train import TrainConfig, load_checkpoint, save_checkpoint


def digits_config(out, model: str = "binarynet_mlp", **overrides) -> TrainConfig:
    """A small MLP on sklearn's digits for two epochs, one thread, no progress bar; ``overrides``
    are TrainConfig fields."""
    settings = dict(model=model, dataset="digits", model_kwargs={"hidden": 64, "depth": 1}, epochs=2,
                    batch_size=64, lr=1e-2, out=str(out), progress=False, threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def rewind_to_epoch(out, epoch: int) -> None:
    """Make the run in ``out`` look killed after epoch ``epoch``'s checkpoint: its ``last.pt`` holds
    that epoch's state; the metrics files keep whatever the later epochs wrote."""
    state = load_checkpoint(out / "last.pt")
    save_checkpoint(out / "last.pt", dict(state, epoch=epoch, history=state["history"][:epoch]))
