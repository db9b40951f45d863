"""XNOR-Net (Rastegari, Ordonez, Redmon, Farhadi 2016, "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks"): scaled binary weights and activations.

Weights are ``α·sign(W)`` with α = mean |W| per output channel (``"scaled_sign"``, the
paper's optimal scale for each filter); activations are ``β·sign(x)`` with β = mean |x| per sample (the
same quantizer on a batch; a simplification of the paper's K map, which averages |x| over
channels and each receptive field).

**Block order.** XNOR-Net's block (Fig. 3) is ``BatchNorm → BinActiv → BinConv → Pool``.
Chained, consecutive blocks read ``… → Conv → Pool → BN → BinActiv → Conv → Pool → BN → …``,
which is exactly BinaryNet's ``conv → pool → BN → sign → conv`` order with the binarization
as the next layer's ``input_quantizer``. So the XNOR models are BinaryNet's architectures
(:func:`onebit.models.binarynet.mlp` / ``cnn``) with scaled quantizers; the only
difference at the ends is that XNOR-Net's first block starts with a BN on the image, omitted
here (the first layer takes the real input directly), and its last layer ends in a BN
(the logits), as in BinaryNet. XNOR-Net keeps the first and last layers in full precision;
pass ``float_first_last=True`` for that (the default binarizes them, like BinaryNet, so the
whole network exports to XNOR/popcount kernels).
"""
from __future__ import annotations

from torch import nn

from . import MODELS
from .binarynet import build, cnn, mlp

__all__ = ["xnor_cnn", "xnor_mlp"]

_XNOR = dict(weight_quantizer="scaled_sign", input_quantizer="scaled_sign", weight_clip=1.0)


@MODELS.register
def xnor_mlp(**kwargs) -> nn.Sequential:
    """XNOR-Net MLP (Rastegari et al. 2016): BinaryNet's 3×4096 MLP with α-scaled binary weights and activations.

    Keywords: see :func:`onebit.models.binarynet.mlp`.
    """
    return build(mlp, "xnor_mlp", kwargs, **_XNOR)


@MODELS.register
def xnor_cnn(**kwargs) -> nn.Sequential:
    """XNOR-Net CNN (Rastegari et al. 2016, Fig. 3 block order): BinaryNet's CIFAR-10 VGG with α-scaled binary weights and activations.

    Keywords: see :func:`onebit.models.binarynet.cnn`.
    """
    return build(cnn, "xnor_cnn", kwargs, **_XNOR)
