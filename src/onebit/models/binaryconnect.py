"""BinaryConnect (Courbariaux, Bengio, David 2015, "BinaryConnect: Training Deep Neural
Networks with binary weights during propagations"): binary weights, real activations.

The networks are BinaryNet's (:func:`onebit.models.binarynet.mlp` / ``cnn``) with real
ReLU activations after each BatchNorm instead of sign inputs, as in the authors' code
(github.com/MatthieuCourbariaux/BinaryConnect, ``mnist.py``: BatchNormLayer with
``nonlinearity=rectify``; 3 hidden layers of 2048 units, no dropout). Weights are binarized
deterministically (``"sign"``) by default; ``weight_quantizer="stochastic_sign"`` gives the
paper's stochastic BinaryConnect in training (+1 with probability hard_sigmoid(w)). At test
time the paper's code uses the real-valued weights; onebit evaluates sign(w), the binary
network that exports (with batch-norm statistics re-estimated for it, see
:func:`onebit.layers.recompute_batchnorm`). Latent weights are clipped to [−1, 1].
"""
from __future__ import annotations

from torch import nn

from . import MODELS
from .binarynet import build, cnn, mlp

__all__ = ["binaryconnect_cnn", "binaryconnect_mlp"]


@MODELS.register
def binaryconnect_mlp(**kwargs) -> nn.Sequential:
    """BinaryConnect MLP (Courbariaux et al. 2015, MNIST results): 3×2048 binary weights, ReLU activations.

    Flatten → 3 × (Linear[sign weights] → BN → ReLU) → Linear[sign weights] → BN. Keywords:
    see :func:`onebit.models.binarynet.mlp` (``weight_quantizer="stochastic_sign"`` for the
    stochastic variant).
    """
    return build(mlp, "binaryconnect_mlp", kwargs, hidden=2048, weight_quantizer="sign", input_quantizer=None,
                 activation="relu", weight_clip=1.0)


@MODELS.register
def binaryconnect_cnn(**kwargs) -> nn.Sequential:
    """BinaryConnect CNN (Courbariaux et al. 2015, CIFAR-10 results): (2×128C3)–MP2–(2×256C3)–MP2–(2×512C3)–MP2–(2×1024FC)–10, ReLU.

    BinaryNet's CNN with binary weights and real ReLU activations (conv → pool → BN → ReLU).
    Keywords: see :func:`onebit.models.binarynet.cnn`.
    """
    return build(cnn, "binaryconnect_cnn", kwargs, weight_quantizer="sign", input_quantizer=None,
                 activation="relu", weight_clip=1.0)
