"""Wide residual networks with 1-bit weights: McDonnell (2018), "Training wide residual networks
for deployment using a single bit for each weight", ICLR 2018, arXiv:1802.08530, and the
author's code, github.com/McDonnell-Lab/1-bit-per-weight (``ResNetModel.py``: ``resnet``,
``resnet_layer``, ``BinaryConv2D``; the MATLAB and Keras versions agree on what follows).

Architecture (WRN-d-k: d weight layers, width k; the paper's CIFAR network is WRN-20-10)::

    stem:   BN(input, learned scale/offset) → conv3×3 → 16k channels
    stage1: n × block(16k),  stage2: n × block(32k, first stride 2),  stage3: n × block(64k, first stride 2)
    block:  x → [BN → ReLU → conv3×3(stride s)] → [BN → ReLU → conv3×3] → + shortcut(x)
    head:   BN → ReLU → conv1×1 → num_classes → BN → global average pool → logits

with n = (d − 2) / 6 blocks per stage (20 = 1 stem + 18 block convs + 1 head conv). Choices and
their sources:

* **1-bit weights** (Section 2.1.1, eq. 1): every convolution, the first and the last included,
  uses ``sign(W)·sqrt(2 / (F²·C_in))``, the He-init standard deviation as a *fixed, unlearned*
  per-layer scale; the gradient reaches the latent float weight unchanged (the ``"he_sign"``
  quantizer of :mod:`onebit.quantizers`). The latent weights are He-initialised (Section 3.2:
  "We use the initialization method of He et al. (2015a)"): a normal with std sqrt(2 / fan_in),
  as the author's MATLAB ``WideResNet_Train.m`` draws them (``randn * LayerWeights``; the Keras
  version uses a truncated ``he_normal``), and are not clipped. No convolution has a bias
  (Section 3.2.1).
* **Pre-activation blocks** (Section 3.1, Fig. 3): each convolution is preceded by BN and ReLU
  (He et al. 2016 / Zagoruyko & Komodakis 2016 ordering); the residual path carries the raw sum.
* **BN without learned scale and offset** (Section 3.2.1, for CIFAR-10/100 and SVHN): every BN
  has ``affine=False`` except the one on the input. The paper says the input BN learns its
  scale and offset "when a ReLU is used there" (Appendix A.2, Fig. 3: the input ReLU is
  optional); the author's Keras ``resnet`` uses no input ReLU and still learns that BN's
  parameters (``learn_bn = True``, ``UseRelu=False``), which is the default here
  (``input_bn_affine=True``). ``bn_affine=True`` learns all BN parameters (the paper's choice
  for ImageNet, where not learning them only hurts). The input BN replaces any input
  normalisation (Section 3.2: "we did not subtract the mean, as the initial BN layer ...
  performs this role").
* **BN constants**: ε = 1e-5 (end of Section 3.2.1, on MatConvNet's ε; ``epsilon=1e-5`` in
  ResNetModel.py) and Keras' default moving-average momentum 0.99 (``bn_moments_momentum =
  0.99``), i.e. torch ``momentum=0.01``. The paper found "a small benefit" in recomputing the
  inference moments over the training set after training instead (Section 3.2.1); that is a
  training-loop step, not part of the model.
* **Stem width** (Appendix A.3): the first convolution already has 16k channels, so the first
  stage needs no projection.
* **Downsampling shortcut** (Appendix A.1, Fig. 4): 3×3 average pooling with stride 2 on the
  residual path, then the channels doubled with zeros ("zero-padding ... as per option 1 of He
  et al. (2015b)"); ResNetModel.py: ``AveragePooling2D(pool_size=(3, 3), strides=2,
  padding='same')`` then ``concatenate([x, zeros_like(x)])`` (the new channels come last).
  Keras' ``'same'`` pooling leaves the padded cells out of the average, so here
  ``count_include_pad=False``. *Uncertainty*: for even sizes Keras/TensorFlow ``'same'`` pads
  stride-2 windows only at the bottom/right (windows centred on pixels 1, 3, 5, ...), torch's
  ``padding=1`` pads both sides (centred on 0, 2, 4, ...); the strided 3×3 convolution of the
  block is padded the same way here, so both paths stay aligned with each other, but the
  sampling grid is shifted by one pixel with respect to the author's code.
* **Head** (Section 3.3, Fig. 3): the final weight layer is a 1×1 convolution to ``num_classes``
  channels *before* global average pooling (order exchanged with the usual GAP → FC), preceded
  by BN → ReLU like every convolution and followed by a BN without scale/offset (Appendix A.2:
  no ReLU after it); its pooled output is the logits (the softmax is in the loss).

The model is an ``nn.Sequential`` of ``stem``, ``stage1`` … ``stage3`` (``nn.Sequential`` of
:class:`PreActBlock`) and ``head``; each BN → ReLU → conv triple is an ``nn.Sequential``
(``bn``, ``relu``, ``conv``), the pattern :func:`onebit.memory.compressed_activations` fuses.
:mod:`onebit.export` writes these models to ``.onebit`` (each block as its two branches reading
the same value and an ``add``; the shortcut as ``avgpool`` and ``pad_channels``; docs/export.md)
and the engine runs them with real activations: every convolution a float-input × sign-weight
product, its fixed scale folded into the next BN's affine (an affine of its own before a
residual ``add``). The float twin exports too, with float convolutions. Float sums in another
order than torch's: close to float32 rounding, not bit-exact. ONNX export refuses the blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OnebitError
from ..layers import QuantConv2d
from . import MODELS
from .binarynet import (
    MAX_LAYERS,
    _allocating,
    _check_batchnorm,
    _check_flag,
    _check_positive,
    _check_shape,
    _check_weights,
    _check_width,
    _finish,
    _scaled,
    build,
)

__all__ = ["Downsample", "PreActBlock", "float_wrn", "wrn", "wrn_1bit"]


class Downsample(nn.Module):
    """The residual path of a downsampling block: 3×3 average pool, stride 2, then ``extra`` zero channels appended."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.extra_channels = int(extra_channels)

    def forward(self, x: Tensor) -> Tensor:
        # F.pad's last pair pads dim 1 (channels) at its end: concat([x, zeros]) as in ResNetModel.py
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}"


class PreActBlock(nn.Module):
    """Pre-activation residual block: ``unit2(unit1(x)) + shortcut(x)``, each unit BN → ReLU → conv3×3."""

    def __init__(self, unit1: nn.Sequential, unit2: nn.Sequential, shortcut: nn.Module) -> None:
        super().__init__()
        self.unit1 = unit1
        self.unit2 = unit2
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.unit2(self.unit1(x)) + self.shortcut(x)


def wrn(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    depth: int = 20,
    width: float = 10,
    binary_weights: bool = True,
    bn_affine: bool = False,
    input_bn_affine: bool = True,
    bn_momentum: float = 0.01,
    bn_eps: float = 1e-5,
) -> nn.Sequential:
    """McDonnell's pre-activation Wide ResNet WRN-``depth``-``width`` (see the module docstring).

    ``depth`` = 6n + 2 (20, 26, ...); ``width`` k gives stages of 16k, 32k, 64k channels
    (rounded, at least 1, so ``width=1/16`` makes a toy net). ``binary_weights`` puts the
    ``"he_sign"`` quantizer on every convolution (False: the full-precision twin, same layers).
    ``bn_affine`` learns the scale/offset of the BNs after the input one, ``input_bn_affine``
    that of the input BN. Children: ``stem`` (``bn``, ``conv``), ``stage1`` … ``stage3``
    (``block1`` … ``block{n}``, each ``unit1``, ``unit2``, ``shortcut``), ``head`` (``bn``,
    ``relu``, ``conv``, ``bn_out``, ``pool``, ``flatten``).
    """
    in_shape = _check_shape(in_shape)
    num_classes = _check_positive("num_classes", num_classes)
    depth = _check_positive("depth", depth, maximum=MAX_LAYERS)
    if depth < 8 or (depth - 2) % 6:
        raise OnebitError(f"WRN depth must be 6n + 2 with n ≥ 1 (8, 14, 20, 26, ... {MAX_LAYERS - 2}), got {depth}")
    base = _scaled(_check_width(width), 16, "stem width")
    for name, flag in (("binary_weights", binary_weights), ("bn_affine", bn_affine), ("input_bn_affine", input_bn_affine)):
        _check_flag(name, flag)
    _check_batchnorm(bn_eps, bn_momentum)
    n = (depth - 2) // 6
    quantizer = "he_sign" if binary_weights else None
    c = in_shape[0]
    sizes = [("stem", c * base * 9)]  # the weight count of every convolution, checked before any is built
    for stage, channels in enumerate((base, 2 * base, 4 * base), start=1):
        sizes += [(f"stage{stage}.block1", (c + channels) * channels * 9)]
        sizes += [(f"stage{stage}.block{b + 1}", 2 * channels * channels * 9) for b in range(1, n)]
        c = channels
    sizes.append(("head", c * num_classes))
    weights = _check_weights(sizes)

    def conv(c_in: int, c_out: int, k: int, stride: int = 1) -> QuantConv2d:
        layer = QuantConv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False, weight_quantizer=quantizer)
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")  # std sqrt(2 / fan_in)
        return layer

    def norm(c: int, affine: bool) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum, affine=affine)

    def unit(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(OrderedDict(bn=norm(c_in, bn_affine), relu=nn.ReLU(), conv=conv(c_in, c_out, k, stride)))

    with _allocating(weights):
        c = in_shape[0]
        layers: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(OrderedDict(bn=norm(c, input_bn_affine), conv=conv(c, base, 3))))
        ]
        c = base
        for stage, channels in enumerate((base, 2 * base, 4 * base), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                shortcut = Downsample(channels - c) if stride == 2 else nn.Identity()
                blocks.append(
                    (f"block{b + 1}", PreActBlock(unit(c, channels, 3, stride), unit(channels, channels), shortcut))
                )
                c = channels
            layers.append((f"stage{stage}", nn.Sequential(OrderedDict(blocks))))
        head = unit(c, num_classes, k=1)
        head.add_module("bn_out", norm(num_classes, bn_affine))
        head.add_module("pool", nn.AdaptiveAvgPool2d(1))
        head.add_module("flatten", nn.Flatten())
        layers.append(("head", head))
    model = _finish(nn.Sequential(OrderedDict(layers)), in_shape, num_classes)
    model.depth = depth
    model.width = width
    model.exportable = True  # onebit.export walks the residual blocks (see the module docstring)
    return model


@MODELS.register
def wrn_1bit(**kwargs) -> nn.Sequential:
    """1-bit-weight Wide ResNet (McDonnell 2018, ICLR): WRN-20-10, sign(W)·sqrt(2/fan_in) in every conv, BN without scale/offset.

    Pre-activation blocks, 16k/32k/64k channels, average-pool + zero-channel shortcuts, a 1×1
    conv → BN → global-average-pool head. Keywords: see :func:`onebit.models.wrn.wrn`
    (``depth``, ``width``, ``binary_weights``, ``bn_affine``, ...).
    """
    return build(wrn, "wrn_1bit", kwargs, binary_weights=True)


@MODELS.register
def float_wrn(**kwargs) -> nn.Sequential:
    """Full-precision twin of wrn_1bit (McDonnell 2018's 32-bit baseline): the same WRN-20-10 with float weights."""
    return build(wrn, "float_wrn", kwargs, binary_weights=False)
