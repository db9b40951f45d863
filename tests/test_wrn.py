"""McDonnell (2018) wide ResNets with 1-bit weights: architecture, He-constant weights, float twin, recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.errors import OnebitError
from onebit.layers import QuantConv2d
from onebit.models import create_model
from onebit.models.wrn import Downsample, PreActBlock
from onebit.quantizers import HeSign, he_constant


def convs(model: nn.Module) -> list[QuantConv2d]:
    return [m for m in model.modules() if isinstance(m, QuantConv2d)]


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("width", [1, 4])
def test_shapes_depth20(in_shape, width):
    torch.manual_seed(0)
    model = create_model("wrn_1bit", in_shape=in_shape, width=width, num_classes=10)
    assert model.in_shape == in_shape and model.num_classes == 10
    x = torch.randn(2, *in_shape)
    feats = model.stem(x)
    assert feats.shape == (2, 16 * width, *in_shape[1:])
    feats = model.stage1(feats)
    assert feats.shape == (2, 16 * width, *in_shape[1:])
    feats = model.stage2(feats)
    half = tuple((s + 1) // 2 for s in in_shape[1:])
    assert feats.shape == (2, 32 * width, *half)
    feats = model.stage3(feats)
    assert feats.shape == (2, 64 * width, *((s + 1) // 2 for s in half))  # 28 → 14 → 7, 32 → 16 → 8
    assert model.head(feats).shape == (2, 10)
    assert model(x).shape == (2, 10)


def test_architecture_follows_the_paper():
    model = create_model("wrn_1bit", width=4)
    layers = convs(model)
    assert len(layers) == 20  # 1 stem + 3 stages × 3 blocks × 2 + 1 head: "20 convolutional layers"
    assert [m.out_channels for m in layers] == [64] + [64] * 6 + [128] * 6 + [256] * 6 + [10]
    assert [m.stride for m in layers if m.stride != (1, 1)] == [(2, 2), (2, 2)]
    assert layers[-1].kernel_size == (1, 1) and all(m.kernel_size == (3, 3) for m in layers[:-1])
    assert all(m.bias is None and isinstance(m.weight_quantizer, HeSign) and m.weight_clip is None for m in layers)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 19 + 1  # input, one before each conv after the stem, one after the head conv
    assert bns[0] is model.stem.bn and bns[0].affine  # the input BN learns scale and offset (authors' code)
    assert not any(b.affine for b in bns[1:])  # Section 3.2.1: no learned BN scale/offset
    assert all(b.eps == 1e-5 and b.momentum == pytest.approx(0.01) for b in bns)
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 9
    assert [type(b.shortcut).__name__ for b in blocks] == ["Identity"] * 3 + ["Downsample", "Identity", "Identity"] * 2
    assert [type(m).__name__ for m in model.head] == [
        "BatchNorm2d", "ReLU", "QuantConv2d", "BatchNorm2d", "AdaptiveAvgPool2d", "Flatten"
    ]
    # about 4.3 million learned parameters for the 4x network (paper, Figure 7 caption)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.3e6, rel=0.01)


def test_one_bit_weight_scale_is_the_he_constant():
    model = create_model("wrn_1bit", width=1, in_shape=(3, 32, 32))
    for layer in convs(model):
        c = he_constant(layer.weight.shape)
        fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        assert c == pytest.approx(math.sqrt(2 / fan_in))
        q = layer.quantized_weight()
        assert torch.equal(q.abs().unique(), torch.tensor([c], dtype=torch.float32))
        assert torch.equal(q > 0, layer.weight >= 0)
        # latent weights are He-initialised: std close to the same constant
        assert layer.weight.std().item() == pytest.approx(c, rel=0.35)


def test_downsample_shortcut_is_average_pool_then_zero_channels():
    down = Downsample(extra_channels=3)
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    out = down(x)
    assert out.shape == (2, 5, 2, 2)
    assert torch.equal(out[:, 2:], torch.zeros(2, 3, 2, 2))
    # 3×3 windows centred on (0, 0), (0, 2), ..., padded cells left out of the average
    expected = x[:, :, 0:2, 0:2].mean(dim=(2, 3))
    assert torch.allclose(out[:, :2, 0, 0], expected)
    assert torch.allclose(out[:, :2, 1, 1], x[:, :, 1:4, 1:4].mean(dim=(2, 3)))


def test_float_twin_equals_the_one_bit_model_when_weights_are_plus_minus_he_constant():
    torch.manual_seed(0)
    binary = create_model("wrn_1bit", width=1, in_shape=(1, 28, 28))
    twin = create_model("float_wrn", width=1, in_shape=(1, 28, 28))
    assert all(m.weight_quantizer is None for m in convs(twin))
    with torch.no_grad():
        for layer in convs(binary):
            layer.weight.copy_(torch.where(layer.weight >= 0, 1.0, -1.0) * he_constant(layer.weight.shape))
    twin.load_state_dict(binary.state_dict())
    x = torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    out_b, out_t = binary(x), twin(x)
    assert torch.equal(out_b, out_t)
    F.cross_entropy(out_b, y).backward()
    F.cross_entropy(out_t, y).backward()
    # straight-through gradient: the latent weights get exactly the float twin's gradient
    for (name, p), q in zip(binary.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    binary.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(binary(x), twin(x))


def test_options_and_errors():
    learn = create_model("wrn_1bit", width=1, bn_affine=True, input_bn_affine=False)
    bns = [m for m in learn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not bns[0].affine and all(b.affine for b in bns[1:])
    deeper = create_model("float_wrn", depth=26, width=1)
    assert len(convs(deeper)) == 26
    assert len(convs(create_model("wrn_1bit", width=2, binary_weights=False))) == 20
    for bad in (19, 21, 2, 0):
        with pytest.raises(OnebitError, match="depth"):
            create_model("wrn_1bit", depth=bad, width=1)
    with pytest.raises(OnebitError, match="width"):
        create_model("wrn_1bit", width=0)
    with pytest.raises(OnebitError, match="no argument 'hidden'"):
        create_model("wrn_1bit", hidden=3)


def test_export_writes_the_residual_model(tmp_path):
    from onebit.export import export_model

    meta = export_model(create_model("wrn_1bit", width=1 / 16), tmp_path / "m.onebit")
    assert {"add", "avgpool", "pad_channels"} <= {layer["op"] for layer in meta["layers"]}  # tests/test_export_wrn.py


def test_weight_decay_skips_batchnorm():
    from onebit.optim import build_optimizer

    model = create_model("wrn_1bit", width=1)
    opt = build_optimizer(model, "sgd", 0.1, weight_decay=5e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    decay = {id(p) for p in groups["decay"]["params"]}
    assert decay == {id(m.weight) for m in convs(model)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(model.stem.bn.weight), id(model.stem.bn.bias)}
    assert opt.param_groups[0]["momentum"] == 0.9


def test_mcdonnell_recipes():
    from onebit.recipes import load_recipe, recipe_config

    r = load_recipe("mcdonnell_wrn")
    assert (r["model"], r["float_twin"], r["dataset"]) == ("wrn_1bit", "float_wrn", "cifar10")
    assert (r["optimizer"], r["lr"], r["lr_end"], r["scheduler"]) == ("sgd", 0.1, 1e-5, "sgdr")
    assert (r["epochs"], r["batch_size"], r["weight_decay"], r["loss"]) == (254, 125, 5e-4, "cross_entropy")
    assert r["model_kwargs"] == {"depth": 20, "width": 10, "bn_affine": False, "input_bn_affine": True}
    assert r["val_fraction"] == 0.0 and r["lr_scaling"] is False
    twin = recipe_config("mcdonnell_wrn", twin=True, out="x")
    base = recipe_config("mcdonnell_wrn_float", out="x")
    a, b = twin.__dict__.copy(), base.__dict__.copy()
    a.pop("recipe", None), b.pop("recipe", None)
    assert a == b


@pytest.mark.slow
def test_recipe_trains_a_few_steps(real_data_dir, tmp_path, monkeypatch):
    """The recipe's optimizer, schedule and loss on a small WRN and 1000 Fashion-MNIST images: the loss falls."""
    from onebit.data import BatchLoader, load_dataset
    from onebit.losses import get_loss
    from onebit.optim import build_optimizer, build_scheduler
    from onebit.recipes import recipe_config
    from onebit.train import model_kwargs_for

    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    config = recipe_config("mcdonnell_wrn", dataset="fashion_mnist", model_kwargs={"width": 1}, epochs=2)
    data = load_dataset("fashion_mnist", "train", data_dir=real_data_dir, download=False)
    data.images, data.labels = data.images[:1000], data.labels[:1000]
    torch.manual_seed(0)
    model = create_model(config.model, **model_kwargs_for(config)).train()
    optimizer = build_optimizer(model, config.optimizer, config.lr, weight_decay=config.weight_decay)
    loader = BatchLoader(data, config.batch_size, shuffle=True, seed=0)
    scheduler = build_scheduler(optimizer, config.scheduler, epochs=config.epochs, steps_per_epoch=len(loader),
                                lr_end=config.lr_end)
    loss_fn = get_loss(config.loss)
    losses = []
    for epoch in range(config.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step_batch()
            losses.append(loss.item())
        scheduler.step_epoch()
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
