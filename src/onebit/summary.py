"""Bits, memory and multiply-accumulates of a quantized model, layer by layer (after Larq's summary).

    from onebit.models import create_model
    from onebit.summary import summarize
    print(summarize(create_model("binarynet_mlp")).table())

A MAC counts as *binary* when both the layer's input and its weights are 1-bit, so it runs as
XNOR + popcount; every other MAC is a float MAC. Memory is what the parameters take at their
precision (binary weights 1 bit, everything else 32 bits), next to what they take as float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import QuantConv2d, QuantLinear

FLOAT_BITS = 32


def _precision(quantizer: nn.Module | None) -> int:
    return FLOAT_BITS if quantizer is None else int(getattr(quantizer, "precision", FLOAT_BITS))


@dataclass
class LayerRow:
    name: str
    kind: str
    input_bits: int | None
    weight_bits: int | None
    params: int
    bits: int
    macs: int
    binary_macs: int

    @property
    def float_bits(self) -> int:
        return self.params * FLOAT_BITS


@dataclass
class ModelSummary:
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.rows)

    @property
    def float_bits(self) -> int:
        return sum(r.float_bits for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def binary_macs(self) -> int:
        return sum(r.binary_macs for r in self.rows)

    @property
    def compression(self) -> float:
        return self.float_bits / self.bits if self.bits else 1.0

    @property
    def binary_mac_fraction(self) -> float:
        return self.binary_macs / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [vars(r) | {"float_bits": r.float_bits} for r in self.rows],
            "params": self.params,
            "bits": self.bits,
            "float_bits": self.float_bits,
            "macs": self.macs,
            "binary_macs": self.binary_macs,
            "compression": self.compression,
            "binary_mac_fraction": self.binary_mac_fraction,
        }

    def table(self) -> str:
        header = ["layer", "type", "in bits", "w bits", "params", "memory", "float32 memory", "binary MACs", "float MACs"]
        lines = [
            [
                r.name,
                r.kind,
                "-" if r.input_bits is None else str(r.input_bits),
                "-" if r.weight_bits is None else str(r.weight_bits),
                f"{r.params:,}",
                _bytes(r.bits),
                _bytes(r.float_bits),
                f"{r.binary_macs:,}",
                f"{r.macs - r.binary_macs:,}",
            ]
            for r in self.rows
        ]
        lines.append(
            [
                "total",
                "",
                "",
                "",
                f"{self.params:,}",
                _bytes(self.bits),
                _bytes(self.float_bits),
                f"{self.binary_macs:,}",
                f"{self.macs - self.binary_macs:,}",
            ]
        )
        widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join(
            [fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1]), "",
             f"compression vs float32: {self.compression:.1f}x   "
             f"binary MACs: {100 * self.binary_mac_fraction:.1f}% of {self.macs:,}"]
        )


def _bytes(bits: int) -> str:
    value = bits / 8
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _counted_modules(module: nn.Module, prefix: str = ""):
    """Leaf modules, where a quantized layer counts as a leaf although its quantizers are children."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (QuantLinear, QuantConv2d)) or not list(child.children()):
            yield path, child
        else:
            yield from _counted_modules(child, path)


def summarize(model: nn.Module, in_shape: tuple[int, ...] | None = None) -> ModelSummary:
    """Run one sample of shape ``in_shape`` (default: ``model.in_shape``) through ``model`` and tabulate it."""
    in_shape = tuple(in_shape or getattr(model, "in_shape"))
    output_elements: dict[nn.Module, int] = {}

    def record(module, inputs, output):
        output_elements[module] = output.numel()  # batch of one

    leaves = list(_counted_modules(model))
    handles = [m.register_forward_hook(record) for _, m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    summary = ModelSummary()
    for name, module in leaves:
        params = sum(p.numel() for p in module.parameters())
        if isinstance(module, (QuantLinear, QuantConv2d)):
            input_bits = _precision(module.input_quantizer)
            weight_bits = _precision(module.weight_quantizer)
            weight = module.weight.numel()
            bias = params - weight
            # each output element costs one MAC per weight feeding it
            fan_in = weight // module.weight.shape[0]
            macs = output_elements.get(module, 0) * fan_in
            binary = macs if input_bits == 1 and weight_bits == 1 else 0
            bits = weight * weight_bits + bias * FLOAT_BITS
        elif params == 0:
            continue
        else:
            input_bits = weight_bits = None
            macs = binary = 0
            bits = params * FLOAT_BITS
        summary.rows.append(
            LayerRow(name or type(module).__name__, type(module).__name__, input_bits, weight_bits, params, bits, macs, binary)
        )
    if not summary.rows:
        raise ValueError("model has no parameters to summarize")
    return summary
