"""The model zoo: one module per paper family, every model registered by name in :data:`MODELS`.

    from onebit.models import create_model, list_models
    model = create_model("binarynet_cnn", in_shape=(1, 28, 28), width=0.5)

Every model is an ``nn.Sequential`` (nested) of ``nn.Flatten``, ``nn.Dropout``,
:class:`~onebit.layers.QuantLinear`, :class:`~onebit.layers.QuantConv2d`,
``nn.BatchNorm1d/2d``, ``nn.MaxPool2d``, ``nn.ReLU``/``nn.Hardtanh`` (the module set that
:mod:`onebit.export` understands), with ``model.in_shape`` (C, H, W) and
``model.num_classes`` set. All factories take ``in_shape`` and ``num_classes``; MLPs default
to (1, 28, 28), CNNs to (3, 32, 32). A factory's first docstring line is its one-line summary
(``onebit models``).

=====================  =====================================================================
``binarynet_*``        sign weights and activations (Courbariaux et al. 2016)
``binaryconnect_*``    sign weights, ReLU activations (Courbariaux et al. 2015)
``xnor_*``             α-scaled sign weights and activations (Rastegari et al. 2016)
``wrn_1bit``           Wide ResNet, sign weights × a fixed He-init scale per layer (McDonnell 2018)
``float_*``            the same architectures in full precision (baselines)
=====================  =====================================================================
"""
from __future__ import annotations

from torch import nn

from ..registry import Registry

MODELS = Registry("model")

# imported for their @MODELS.register side effect; after MODELS exists
from . import binaryconnect, binarynet, xnor  # noqa: E402,F401
from . import wrn  # noqa: E402,F401

__all__ = ["MODELS", "create_model", "list_models"]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    An unknown name raises :class:`onebit.errors.UnknownNameError` listing the valid names; an
    unknown or invalid keyword raises :class:`onebit.errors.OnebitError`. Sizes are checked
    before anything is allocated: every size (an ``in_shape`` dimension, ``hidden``, a channel
    count, ``num_classes``) at most 2^31, at most 1000 layers of one kind (``depth``, a CNN's
    convolutions or FC layers) and at most 2^31 weights per model
    (:data:`onebit.models.binarynet.MAX_WEIGHTS`); a larger model, quantizer arguments its
    quantizer does not take and a failed allocation are a :class:`onebit.errors.ConfigError`
    that names the model.
    """
    return MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()
