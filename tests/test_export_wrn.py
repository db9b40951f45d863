"""McDonnell's 1-bit-weight Wide ResNets on the engine: residual graphs (``input``/``inputs``,
``add``), ``avgpool`` and ``pad_channels``; logits against PyTorch on every kernel path, the
file round trip, hostile graphs, and the command line."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from onebit.bench import calibrate_batchnorm
from onebit.cli import main
from onebit.engine import kernels, load
from onebit.engine import format as fmt
from onebit.engine.format import check_graph, read_model, write_model
from onebit.errors import FormatError
from onebit.export import ExportError, build_graph, export_model, export_onnx
from onebit.layers import QuantAct
from onebit.models import create_model
from onebit.models.wrn import PreActBlock
from onebit.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

from test_export import assert_every_path_predicts_the_same, assert_logits_close, forward_capturing

PATHS = kernels.available_paths()

pytestmark = pytest.mark.usefixtures("restore_kernel_path")


def calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics measured in train mode on random pixel batches; learned γ, β random (10% of
    γ negative)."""
    g = torch.Generator().manual_seed(seed)
    calibrate_batchnorm(model, g)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d) and bn.affine:
                n = bn.num_features
                gamma = torch.rand(n, generator=g) + 0.5
                bn.weight.copy_(torch.where(torch.rand(n, generator=g) < 0.1, -gamma, gamma))
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


MODELS = {
    "wrn8-mnist": ("wrn_1bit", dict(in_shape=(1, 28, 28), depth=8, width=0.5)),
    "wrn14-cifar-affine": ("wrn_1bit", dict(in_shape=(3, 32, 32), depth=14, width=0.25, bn_affine=True)),
    "wrn8-cifar-plain-input-bn": ("wrn_1bit", dict(in_shape=(3, 32, 32), depth=8, width=0.4, input_bn_affine=False)),
    "float-wrn8-mnist": ("float_wrn", dict(in_shape=(1, 28, 28), depth=8, width=0.25)),
}
_exported: dict[str, tuple] = {}


def exported(key: str, tmp_path_factory) -> tuple[nn.Module, Path]:
    if key not in _exported:
        name, kwargs = MODELS[key]
        torch.manual_seed(len(key))
        model = calibrate(create_model(name, **kwargs), seed=len(key))
        path = tmp_path_factory.mktemp("wrn") / f"{key}.onebit"
        export_model(model, path, source={"name": name, "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in kwargs.items()}})
        _exported[key] = (model, path)
    return _exported[key]


def inputs(n: int, shape, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 0.7 + 0.3


def torch_blocks(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and every residual block's output (NCHW), by module name."""
    return forward_capturing(model, x, (PreActBlock,))


# --------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", sorted(MODELS))
def test_engine_follows_pytorch(key, path, tmp_path_factory):
    """Float activations: not bit-exact (other summation orders), within float32 rounding of the
    logits' scale; the same classes; every block's output close as well."""
    model, file = exported(key, tmp_path_factory)
    kernels.set_path(path)
    engine = load(file)
    shape = MODELS[key][1]["in_shape"]
    for n in (1, 5):
        x = inputs(n, shape, seed=10 + n)
        logits, blocks = torch_blocks(model, x)
        predicted = engine.predict(x.numpy())
        assert predicted.dtype == np.float32 and predicted.shape == (n, 10)
        assert_logits_close(predicted, logits)
        np.testing.assert_array_equal(predicted.argmax(1), logits.argmax(1))
        trace = engine.trace(x.numpy())
        np.testing.assert_array_equal(trace[-1].value, predicted)  # the plan and the op-by-op trace agree
        adds = {t.name: t.value for t in trace if t.op == "add"}
        assert list(adds) == list(blocks)
        for name, value in adds.items():
            assert_logits_close(value, blocks[name])


def test_all_paths_agree_exactly(tmp_path_factory):
    _, file = exported("wrn14-cifar-affine", tmp_path_factory)
    assert_every_path_predicts_the_same(file, inputs(3, (3, 32, 32), seed=4).numpy())


def test_concurrent_predictions_match_serial(tmp_path_factory):
    _, file = exported("wrn8-mnist", tmp_path_factory)
    engine = load(file, threads=1)
    batches = [inputs(n % 3 + 1, (1, 28, 28), seed=n).numpy() for n in range(12)]
    serial = [engine.predict(b) for b in batches]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for got, want in zip(pool.map(engine.predict, batches), serial):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- the exported graph
def test_graph_of_a_wrn(tmp_path_factory):
    model, file = exported("wrn14-cifar-affine", tmp_path_factory)
    meta, tensors = read_model(file)
    layers = meta["layers"]
    ops = [layer["op"] for layer in layers]
    blocks = [name for name, m in model.named_modules() if isinstance(m, PreActBlock)]
    assert [layer["name"] for layer in layers if layer["op"] == "add"] == blocks  # one add per block
    assert ops.count("pad_channels") == 2 and ops.count("avgpool") == 3  # two downsampling shortcuts, the head's pool
    assert ops[:3] == ["affine", "conv", "affine"]  # input BN, stem conv, its he_sign scale
    assert ops[-2:] == ["avgpool", "flatten"] and layers[-2]["params"]["kernel"] == [8, 8]
    convs = [layer for layer in layers if layer["op"] == "conv"]
    assert len(convs) == 14 and all(c["params"]["weights"] == "binary" for c in convs)
    assert {tuple(c["params"]["stride"]) for c in convs} == {(1, 1), (2, 2)}
    # only the shortcuts read an earlier value; everything else reads the previous output
    for index, layer in enumerate(layers):
        if layer["op"] == "add":
            assert index - 1 in layer["inputs"] and "input" not in layer
        elif "input" in layer:  # a downsampling shortcut reads the previous block's output
            assert layer["op"] == "avgpool" and layers[layer["input"]]["op"] == "add"
    assert sum("input" in layer for layer in layers) == 2
    assert "add(" in load(file).summary()
    # round trip: written again, the same graph, tensors and bytes
    copy = file.with_name("copy.onebit")
    write_model(copy, meta, tensors)
    meta2, tensors2 = read_model(copy)
    assert meta2["layers"] == layers and set(tensors2) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(tensors2[name], tensors[name])
    assert copy.read_bytes() == file.read_bytes()


def test_sequential_models_keep_their_graph(tmp_path):
    """A model without residual blocks gets no ``input``/``inputs`` field: its file is what it was."""
    torch.manual_seed(0)
    model = create_model("binarynet_cnn", in_shape=(1, 8, 8), num_classes=3, channels=(8, 8, 8), fc_units=8).eval()
    meta, _ = build_graph(model)
    assert all(set(layer) == {"op", "name", "params", "tensors"} for layer in meta["layers"])


def test_float_wrn_exports_float_convolutions(tmp_path_factory):
    _, file = exported("float-wrn8-mnist", tmp_path_factory)
    convs = [layer for layer in read_model(file)[0]["layers"] if layer["op"] == "conv"]
    assert convs and all(c["params"]["weights"] == "float" for c in convs)


def test_wrn_file_is_over_25x_smaller_than_float32(tmp_path):
    """1 bit per weight where the channels fill 64-bit words (64, 128, 256 here; 32 would pad
    each tap to a word), float32 only for the per-channel affines."""
    model = create_model("wrn_1bit", in_shape=(3, 32, 32), depth=8, width=4).eval()
    export_model(model, tmp_path / "m.onebit")
    float_bytes = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert float_bytes / (tmp_path / "m.onebit").stat().st_size > 25


# --------------------------------------------------------------------------- what does not export
def one_line_export_error(model: nn.Module, tmp_path: Path, match: str) -> None:
    with pytest.raises(ExportError, match=match) as info:
        export_model(model, tmp_path / "bad.onebit")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad.onebit").exists()


def test_unsupported_pooling_and_branches(tmp_path):
    def wrn():
        return create_model("wrn_1bit", in_shape=(1, 12, 12), depth=8, width=0.25).eval()

    model = wrn()
    model.stage2.block1.shortcut.pool.count_include_pad = True
    one_line_export_error(model, tmp_path, "count_include_pad=False only")
    model = wrn()
    model.stage2.block1.shortcut.pool.ceil_mode = True
    one_line_export_error(model, tmp_path, "ceil_mode")
    model = wrn()
    model.head.pool = nn.AdaptiveAvgPool2d(2)
    one_line_export_error(model, tmp_path, r"head.pool: adaptive average pooling to 2 is not supported")
    model = wrn()
    model.stage1.block1.unit2.add_module("sign", QuantAct("sign"))  # the branch ends in bits
    one_line_export_error(model, tmp_path, "stage1.block1: a residual branch must end in a real value")
    model = wrn()
    model.stage1.block1.shortcut = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    one_line_export_error(model, tmp_path,
                          r"stage1.block1: the residual branches end in shapes \(4, 12, 12\) and \(4, 6, 6\)")
    model = wrn()
    model.stem.add_module("sign", QuantAct("sign"))  # the first block gets ±1 bits
    one_line_export_error(model, tmp_path, "stage1.block1: a residual block needs a real")


def test_onnx_export_refuses_residual_blocks(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(ExportError, match="stage1.block1: PreActBlock is not supported by the ONNX exporter"):
        export_onnx(create_model("wrn_1bit", in_shape=(1, 12, 12), depth=8, width=0.25), tmp_path / "m.onnx")


# --------------------------------------------------------------------------- hostile residual graphs
def residual_graph() -> tuple[dict, dict[str, np.ndarray]]:
    """A hand-made residual graph on a [2, 4, 4] input, in the file's own terms::

        0 conv (real x binary) 3 ch -> 1 affine -> 2 clamp -> 3 conv stride 2, 5 ch ------\\
                                   \\-> 4 avgpool 3x3 s2 (input 1) -> 5 pad_channels +2 -> 6 add(3, 5)
        -> 7 avgpool 2x2 (global) -> 8 flatten -> logits [5]
    """
    rng = np.random.default_rng(0)
    layers = [
        {"op": "conv", "name": "conv1", "params": {"out_channels": 3, "weights": "binary", "kernel": [3, 3],
                                                   "stride": [1, 1], "padding": [1, 1], "pad_value": 0.0},
         "tensors": {"weight": "conv1.w"}},
        {"op": "affine", "name": "bn1", "params": {"sample_scale": False}, "tensors": {"mul": "bn1.mul", "add": "bn1.add"}},
        {"op": "clamp", "name": "relu1", "params": {"min": 0.0, "max": None}, "tensors": {}},
        {"op": "conv", "name": "conv2", "params": {"out_channels": 5, "weights": "binary", "kernel": [3, 3],
                                                   "stride": [2, 2], "padding": [1, 1], "pad_value": 0.0},
         "tensors": {"weight": "conv2.w"}},
        {"op": "avgpool", "name": "short.pool", "input": 1,
         "params": {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}, "tensors": {}},
        {"op": "pad_channels", "name": "short", "params": {"extra": 2}, "tensors": {}},
        {"op": "add", "name": "block", "inputs": [3, 5], "params": {}, "tensors": {}},
        {"op": "avgpool", "name": "pool", "params": {"kernel": [2, 2], "stride": [1, 1], "padding": [0, 0]}, "tensors": {}},
        {"op": "flatten", "name": "flatten", "params": {}, "tensors": {}},
    ]
    tensors = {
        "conv1.w": rng.integers(0, 2**18, size=(3, 3, 3, 1), dtype=np.uint64),
        "bn1.mul": rng.normal(size=3).astype(np.float32),
        "bn1.add": rng.normal(size=3).astype(np.float32),
        "conv2.w": rng.integers(0, 2**3, size=(5, 3, 3, 1), dtype=np.uint64),
    }
    return {"input_shape": [2, 4, 4], "num_classes": 5, "layers": layers}, tensors


def full_meta(meta: dict) -> dict:
    return dict(meta, format="onebit", format_version=fmt.FORMAT_VERSION, conventions=dict(fmt.CONVENTIONS),
                onebit_version="0")


def reference(x: np.ndarray, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The residual graph in torch, from the file's bits."""
    def weight(name: str, c: int) -> torch.Tensor:
        negative = np.unpackbits(tensors[name].view(np.uint8), axis=-1, bitorder="little")[..., :c]
        return torch.from_numpy(1.0 - 2.0 * negative.astype(np.float32)).permute(0, 3, 1, 2)  # [O, C, kh, kw]

    F = torch.nn.functional
    x = torch.from_numpy(x)
    y = F.conv2d(x, weight("conv1.w", 2), padding=1)
    y = y * torch.from_numpy(tensors["bn1.mul"])[:, None, None] + torch.from_numpy(tensors["bn1.add"])[:, None, None]
    main = F.conv2d(F.relu(y), weight("conv2.w", 3), stride=2, padding=1)
    shortcut = F.pad(F.avg_pool2d(y, 3, 2, 1, count_include_pad=False), (0, 0, 0, 0, 0, 2))
    return F.avg_pool2d(main + shortcut, 2).flatten(1).numpy()


@pytest.mark.parametrize("path", PATHS)
def test_hand_made_residual_graph_runs(path, tmp_path):
    meta, tensors = residual_graph()
    write_model(tmp_path / "r.onebit", meta, tensors)
    kernels.set_path(path)
    engine = load(tmp_path / "r.onebit")
    x = np.random.default_rng(1).normal(size=(4, 2, 4, 4)).astype(np.float32)
    expected = reference(x, tensors)
    np.testing.assert_allclose(engine.predict(x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert [t.value.shape for t in engine.trace(x)][4:7] == [(4, 3, 2, 2), (4, 5, 2, 2), (4, 5, 2, 2)]


def set_field(index: int, **changes):
    def mutate(meta, tensors):
        meta["layers"][index].update(changes)
    return mutate


def drop_field(index: int, key: str):
    def mutate(meta, tensors):
        meta["layers"][index].pop(key)
    return mutate


def replace_layers(layers: dict[int, dict]):
    def mutate(meta, tensors):
        for index, layer in layers.items():
            meta["layers"][index] = layer
    return mutate


BINARIZE = {"op": "binarize", "name": "sign", "params": {"scale": "none"}}


WINDOW = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}
NOT_INDEX = "layer 4: 'input' must be the index of an earlier value"
NOT_INPUTS = "layer 6: add needs 'inputs': two indices of earlier values"
NOT_ALIKE = "layer 6: add needs two float values of the same shape"
BAD_GRAPHS = {  # case: (mutation, the FormatError's message, a regular expression)
    "input forward": (set_field(4, input=5), NOT_INDEX + r", -1 \(the model input\) or 0..3; got 5"),
    "input itself": (set_field(4, input=4), NOT_INDEX),
    "input below -1": (set_field(4, input=-2), NOT_INDEX),
    "input huge": (set_field(4, input=2**70), NOT_INDEX),
    "input bool": (set_field(4, input=True), NOT_INDEX + ".*; got True"),
    "input string": (set_field(4, input="1"), NOT_INDEX + ".*; got '1'"),
    "input layer 0": (set_field(0, input=0), r"layer 0: 'input' must be .*, -1 \(the model input\); got 0"),
    "input shape mismatch": (set_field(4, input=3), NOT_ALIKE + r", got float \[2, 2, 5\] and float \[1, 1, 7\]"),
    "input skips a layer": (set_field(3, input=-1), "layer 2: no later layer reads this layer's output"),
    "inputs forward": (set_field(6, inputs=[3, 7]), NOT_INPUTS),
    "inputs out of range": (set_field(6, inputs=[-5, 5]), NOT_INPUTS),
    "inputs one": (set_field(6, inputs=[5]), NOT_INPUTS),
    "inputs three": (set_field(6, inputs=[3, 5, 5]), NOT_INPUTS),
    "inputs not a list": (set_field(6, inputs=5), NOT_INPUTS),
    "inputs missing": (drop_field(6, "inputs"), NOT_INPUTS),
    "inputs floats": (set_field(6, inputs=[3.0, 5.0]), NOT_INPUTS),
    "add shape mismatch": (set_field(6, inputs=[3, 4]), NOT_ALIKE + r", got float \[2, 2, 5\] and float \[2, 2, 3\]"),
    "add on the input": (set_field(6, inputs=[3, -1]), NOT_ALIKE),
    "add of int": (replace_layers({2: BINARIZE}), NOT_ALIKE + r", got int \[2, 2, 5\] and float \[2, 2, 5\]"),
    "add with input": (set_field(6, input=5), "layer 6: add reads two values, 'inputs', not 'input'"),
    "inputs on conv": (set_field(3, inputs=[2, 2]), "layer 3: conv reads one value, 'input', not 'inputs'"),
    "dead value": (set_field(6, inputs=[3, 3]), "layer 5: no later layer reads this layer's output"),
    "add with tensors": (set_field(6, tensors={"weight": "conv1.w"}), r"layer 6: add takes tensors \[\]"),
    "avgpool padding > half": (set_field(4, params=dict(WINDOW, padding=[2, 1])),
                               "layer 4: avgpool padding must be at most half the kernel"),
    "avgpool kernel too large": (set_field(7, params={"kernel": [3, 3], "stride": [1, 1], "padding": [0, 0]}),
                                 "layer 7: avgpool kernel 3x3 larger than the padded input"),
    "avgpool stride 0": (set_field(4, params=dict(WINDOW, stride=[0, 2])), "layer 4: parameter 'stride' must be 2 ints >= 1"),
    "avgpool kernel missing": (set_field(4, params={"stride": [2, 2], "padding": [1, 1]}), "layer 4: parameter 'kernel'"),
    "avgpool huge padding": (set_field(4, params={"kernel": [2**30, 2**30], "stride": [1, 1], "padding": [2**29, 2**29]}),
                             "layer 4: padded avgpool input .* limit is 16777216"),
    "avgpool with tensors": (set_field(4, tensors={"mul": "bn1.mul"}), r"layer 4: avgpool takes tensors \[\]"),
    "avgpool on a flat value": (replace_layers({7: {"op": "flatten", "name": "f"},
                                                8: {"op": "avgpool", "name": "p", "params": dict(WINDOW, padding=[0, 0])}}),
                                r"layer 8: avgpool needs a float NHWC input, got float \[20\]"),
    "avgpool on bits": (replace_layers({4: dict(BINARIZE, input=1), 5: {"op": "avgpool", "name": "p", "params": WINDOW}}),
                        r"layer 5: avgpool needs a float NHWC input, got bits \[4, 4, 3\]"),
    "pad_channels on bits": (replace_layers({4: dict(BINARIZE, input=1), 5: {"op": "pad_channels", "name": "p",
                                                                              "params": {"extra": 2}}}),
                             r"layer 5: pad_channels needs a float NHWC input, got bits \[4, 4, 3\]"),
    "pad_channels 0": (set_field(5, params={"extra": 0}), "layer 5: parameter 'extra' must be a positive int"),
    "pad_channels negative": (set_field(5, params={"extra": -2}), "layer 5: parameter 'extra'"),
    "pad_channels missing": (set_field(5, params={}), "layer 5: parameter 'extra'"),
    "pad_channels float": (set_field(5, params={"extra": 2.0}), "layer 5: parameter 'extra'"),
    "pad_channels too many": (set_field(5, params={"extra": 2**31 - 1}), "layer 5: pad_channels output .* limit is 16777216"),
    "pad_channels wrong count": (set_field(5, params={"extra": 3}), NOT_ALIKE),
    "pad_channels with tensors": (set_field(5, tensors={"weight": "conv2.w"}), r"layer 5: pad_channels takes tensors \[\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
def test_bad_residual_graphs_are_one_line_format_errors(case, tmp_path):
    mutate, message = BAD_GRAPHS[case]
    meta, tensors = residual_graph()
    mutate(meta, tensors)
    with pytest.raises(FormatError, match=message) as info:
        check_graph(full_meta(meta), tensors)
    assert "\n" not in str(info.value)
    with pytest.raises(FormatError, match=message):  # the writer refuses it, and leaves no file
        write_model(tmp_path / "bad.onebit", meta, tensors)
    assert not (tmp_path / "bad.onebit").exists()
    fmt._write_raw(tmp_path / "raw.onebit", full_meta(meta), tensors)  # a file as an attacker writes it
    with pytest.raises(FormatError, match=message):
        load(tmp_path / "raw.onebit")


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def wrn_checkpoint(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A WRN-8 for sklearn's digits (8x8 pixels) with random weights, as `onebit train` saves it."""
    torch.manual_seed(0)
    kwargs = {"in_shape": [1, 8, 8], "num_classes": 10, "depth": 8, "width": 0.5}
    model = calibrate(create_model("wrn_1bit", **kwargs))
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_name": "wrn_1bit",
                "model_kwargs": kwargs, "model_state": model.state_dict(), "epoch": 1,
                "config": {"dataset": "digits", "loss": "cross_entropy"}}, path)
    return path, model


def test_cli_export_and_run(wrn_checkpoint, tmp_path, capsys):
    checkpoint, model = wrn_checkpoint
    model_file = tmp_path / "wrn.onebit"
    assert main(["export", str(checkpoint), "-o", str(model_file)]) == 0
    assert "smaller than the float32 weights" in capsys.readouterr().out
    meta = read_model(model_file)[0]
    assert meta["source_model"]["name"] == "wrn_1bit" and meta["input_levels"] == 16  # the digits' pixel grid
    assert main(["eval", str(checkpoint), "--json"]) == 0
    torch_accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    for kernel in ("numpy", None):
        assert main(["run", str(model_file), "-d", "digits", "--json", *(["--kernel", kernel] if kernel else [])]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["samples"] == 359 and result["input"] == "pixels"
        # float activations: a class could flip only where two logits tie within rounding
        assert abs(result["accuracy"] - torch_accuracy) <= 1 / 359

    x = np.random.default_rng(0).uniform(-1, 1, size=(6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(model_file), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "logits.npy")]) == 0
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert_logits_close(np.load(tmp_path / "logits.npy"), expected)


# --------------------------------------------------------------------------- the benchmark case
def test_bench_wrn_case_quick():
    from onebit import bench

    path = [p for p in PATHS if p != "numpy"][:1] or ["numpy"]
    result = bench.run_benchmark(threads=1, quick=True, reps=1, cases="wrn", paths=path, progress=False)
    rows = result["results"]
    assert [(r["case"], r["batch"]) for r in rows] == [("wrn", b) for b in bench.QUICK.e2e_batches]
    for r in rows:
        assert r["model"] == "wrn_1bit" and r["name"].startswith("wrn_1bit WRN-8-0.25 1x28x28")
        assert r["engine_ms"] > 0 and r["torch_ms"] > 0 and r["gops"] > 0
        assert r["pct_limit"] is None and r["pct_peak"] is None and "engine_offgrid_ms" not in r
        assert r["agreement"] == 1.0
    (size,) = result["sizes"]
    assert size["model"] == "wrn_1bit" and size["onebit_bytes"] > 0
    assert "wrn" not in bench.DEFAULT_CASES and "wrn" in bench.CASES
