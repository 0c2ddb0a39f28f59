"""Importing an ONNX file: ``LSTM``, ``GRU`` or ``RNN`` nodes, then a linear head.

The file is parsed with the ``onnx`` package (``onnx.load``, weights through
``onnx.numpy_helper``; the ``onnx`` extra); nothing runs the graph. The import
follows the one data path from the graph's output back to its input: each node
on it must be a recurrent node (all of one operator, forward only), a layout
node that keeps the feature axis last (Transpose, Squeeze, Unsqueeze, Reshape,
Identity, Cast, Dropout; after the top layer also a Gather or Slice picking
time steps), or a head node (MatMul or Gemm with constant weights, Add of a
constant bias, Relu/Tanh/Sigmoid between linears, a final Sigmoid or
Softmax). Anything else is refused, naming the node.

Gate orders: ONNX's LSTM stacks i, o, f, c (torch: i, f, g, o); its GRU z, r, h
(torch: r, z, n). ``B`` is ``[Wb, Rb]``: torch's ``b_ih`` then ``b_hh``. A GRU
must have ``linear_before_reset=1`` (torch's form, the reset gate applied to
the recurrent product with its bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamlstm import Bundle, ModelConfig
from streamlstm.errors import BundleError, ConfigError
from streamlstm.model import LSTMWeights
from streamlstm.training.importers import ScalerSource, assemble_bundle, reorder_gates

__all__ = ["import_onnx"]

#: ONNX recurrent operators, the cell each is, its default activations, and the
#: order its gate blocks are taken in to make torch's.
_CELLS: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {
    "LSTM": ("lstm", ("sigmoid", "tanh", "tanh"), (0, 2, 3, 1)),
    "GRU": ("gru", ("sigmoid", "tanh"), (1, 0, 2)),
    "RNN": ("rnn", ("tanh",), (0,)),
}
#: Nodes that move axes (or do nothing at inference) and are checked to keep the
#: feature axis last.
_LAYOUT = {"Identity", "Cast", "Dropout", "Transpose", "Squeeze", "Unsqueeze", "Reshape"}
#: Nodes that pick time steps of the top layer's output (not before it).
_PICK = {"Gather", "Slice"}
_HEAD = {"MatMul", "Gemm", "Add", "Relu", "Tanh", "Sigmoid", "Softmax"}
_FLOATS = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def import_onnx(
    path: str | Path, *, scaler: ScalerSource | None = None, name: str | None = None
) -> Bundle:
    """A bundle from an ONNX file of forward ``LSTM``/``GRU``/``RNN`` nodes (one operator)
    and a linear head, as ``torch.onnx.export`` writes an ``nn.LSTM`` + ``nn.Linear``."""
    file = Path(path)
    if not file.is_file():
        raise BundleError(f"ONNX file {str(file)!r} does not exist")
    import onnx  # only the ONNX path needs it

    try:
        model = onnx.load(str(file))
    except Exception as exc:  # the protobuf parser's errors have no common base
        raise BundleError(f"{file.name}: not an ONNX model ({exc})") from exc
    graph = _Graph.of(model.graph, file.name)
    chain = graph.data_path()
    cells = [(node, out) for node, out in chain if node.op_type in _CELLS]
    if not cells:
        raise ConfigError(f"{file.name}: no LSTM, GRU or RNN node on the path to the output")
    for node, _ in cells:  # first: a bidirectional layer's plumbing is refused less clearly
        _refuse_cell_options(graph, node, _attrs(node), _CELLS[node.op_type][1])
    ops = list(dict.fromkeys(node.op_type for node, _ in cells))
    if len(ops) > 1:
        raise ConfigError(
            f"{file.name}: the model mixes recurrent operators ({' -> '.join(ops)}); "
            "streamlstm serves one cell kind in every layer"
        )
    graph.check_layout(chain)
    layers = [graph.cell_weights(node) for node, _ in cells]
    top = chain.index(cells[-1])
    head = _Head(graph, int(layers[-1][1].shape[1]))
    for node, _ in chain[top + 1 :]:
        head.add(node)
    linears, hidden, last = head.finish()
    config = ModelConfig(
        cell=_CELLS[ops[0]][0],
        input_size=int(layers[0][0].shape[1]),
        hidden_sizes=tuple(int(w_hh.shape[1]) for _, w_hh, _, _ in layers),
        head_sizes=tuple(int(w.shape[0]) for w, _ in linears[:-1]),
        output_size=int(linears[-1][0].shape[0]),
        head_activation=hidden,
        dropout=0.0,
    )
    meta = {"source": "onnx", "opset": max((o.version for o in model.opset_import), default=0)}
    return assemble_bundle(
        config, layers, linears, scaler, name or file.stem, meta, activation=last
    )


def _attrs(node: Any) -> dict[str, Any]:
    """A node's attributes as Python values (strings decoded)."""
    from onnx import helper

    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


def _label(node: Any) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


@dataclass
class _Graph:
    """A graph's constants, producers and input, and the checks made on its nodes."""

    graph: Any
    filename: str
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    producers: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: Any, filename: str) -> _Graph:
        from onnx import numpy_helper

        self = cls(graph, filename)
        for tensor in graph.initializer:
            self.constants[tensor.name] = numpy_helper.to_array(tensor)
        for node in graph.node:
            for out in node.output:
                self.producers[out] = node
            if node.op_type == "Constant":
                attr = next(a for a in node.attribute if a.name.startswith("value"))
                value = _attrs(node)[attr.name]
                array = numpy_helper.to_array(value) if attr.name == "value" else value
                self.constants[node.output[0]] = np.asarray(array)
        for value_info in graph.input:
            if value_info.name not in self.constants:
                self.inputs[value_info.name] = value_info
        return self

    def fail(self, node: Any, reason: str) -> ConfigError:
        return ConfigError(f"{self.filename}: {_label(node)} {reason}")

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def data_path(self) -> list[tuple[Any, int]]:
        """The nodes from the graph's input to its one output, each with the index of
        the output the next node reads: every node on it reads one computed tensor
        (a recurrent node reads its ``X``)."""
        if len(self.graph.output) != 1:
            names = ", ".join(o.name for o in self.graph.output)
            raise ConfigError(
                f"{self.filename}: the graph has {len(self.graph.output)} outputs ({names}); "
                "export the prediction alone"
            )
        chain: list[tuple[Any, int]] = []
        name = self.graph.output[0].name
        while name not in self.inputs:
            node = self.producers.get(name)
            if node is None:
                raise BundleError(f"{self.filename}: tensor {name!r} is produced by no node")
            chain.append((node, list(node.output).index(name)))
            if node.op_type in _CELLS:
                name = node.input[0]
                continue
            computed = [i for i in node.input if i and i not in self.constants]
            if len(computed) != 1:
                raise self.fail(
                    node,
                    f"reads {len(computed)} computed tensors ({', '.join(computed)}); only a "
                    "chain of recurrent layers and a linear head imports",
                )
            name = computed[0]
        return chain[::-1]

    def check_layout(self, chain: Sequence[tuple[Any, int]]) -> None:
        """Each node before the head keeps the feature axis last (the rank is followed
        from the graph input's), and each recurrent node reads the layer below's ``Y``."""
        dims = next(iter(self.inputs.values())).type.tensor_type.shape.dim
        if not dims:
            raise BundleError(f"{self.filename}: the graph input's rank is not recorded")
        rank, below = len(dims), None
        for node, out in chain:
            if node.op_type in _CELLS:
                if rank != 3:
                    raise self.fail(node, f"reads a rank-{rank} X; expected [time, batch, feature]")
                if below is not None and below != 0:
                    raise self.fail(node, "reads a final state of the layer below, not its Y")
                rank, below = (4, 3, 3)[out], out
                if out == 2:
                    raise self.fail(node, "feeds its cell state Y_c onward; only Y or Y_h")
                continue
            if node.op_type in _HEAD:
                return
            if node.op_type in _PICK and below is None:
                raise self.fail(node, "picks from the input before the recurrent layers")
            if node.op_type not in _LAYOUT | _PICK:
                raise self.fail(node, "is not supported: " + _WHAT_IMPORTS)
            rank = self.layout_rank(node, rank)

    def layout_rank(self, node: Any, rank: int) -> int:
        """The rank after a layout or pick ``node``, refusing one that moves the last axis."""
        attrs, op = _attrs(node), node.op_type
        last = f"moves or cuts the feature axis (the last of {rank})"
        if op == "Cast" and attrs.get("to") not in _FLOATS:
            raise self.fail(node, "casts to a type that is not floating point")
        if op == "Transpose":
            perm = attrs.get("perm", list(range(rank))[::-1])
            if perm[-1] != rank - 1:
                raise self.fail(node, last)
        elif op in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes", self.const(node.input[1] if len(node.input) > 1 else ""))
            if axes is None:
                raise self.fail(node, "has no axes (it could drop the feature axis)")
            new = rank + len(axes) * (1 if op == "Unsqueeze" else -1)
            bound = new if op == "Unsqueeze" else rank
            if (bound - 1) in {int(a) % bound for a in np.ravel(axes)}:
                raise self.fail(node, last)
            return new
        elif op == "Reshape":
            shape = self.const(node.input[1])
            if shape is None or shape.ndim != 1 or int(shape[-1]) <= 0:
                raise self.fail(node, "has a shape that is not a constant ending in a width")
            return int(shape.size)
        elif op == "Gather":
            axis, index = int(attrs.get("axis", 0)) % rank, self.const(node.input[1])
            if axis == rank - 1 or index is None:
                raise self.fail(node, last)
            return rank - 1 + index.ndim
        elif op == "Slice":
            axes = attrs.get("axes", self.const(node.input[3] if len(node.input) > 3 else ""))
            starts = attrs.get("starts", self.const(node.input[1] if len(node.input) > 1 else ""))
            picked = range(len(starts or ())) if axes is None else np.ravel(axes)
            if (rank - 1) in {int(a) % rank for a in picked}:
                raise self.fail(node, last)
        return rank

    def cell_weights(self, node: Any) -> LSTMWeights:
        """torch's ``(w_ih, w_hh, b_ih, b_hh)`` of a recurrent node (its options checked by
        ``_refuse_cell_options``), refusing peepholes and a state that does not start at
        zero."""
        order, attrs = _CELLS[node.op_type][2], _attrs(node)
        w, r = self.const(node.input[1]), self.const(node.input[2])
        if w is None or r is None:
            raise self.fail(node, "has weights W, R that are not constants of the file")
        gh = w.shape[1]
        b = self.const(node.input[3] if len(node.input) > 3 else "")
        b = np.zeros((1, 2 * gh), np.float32) if b is None else b
        hidden = int(attrs.get("hidden_size") or r.shape[-1])
        if w.shape[0] != 1 or r.shape != (1, gh, hidden) or b.shape != (1, 2 * gh):
            raise self.fail(
                node, f"has W {list(w.shape)}, R {list(r.shape)}, B {list(b.shape)} for "
                f"hidden_size {hidden}: not one direction's {len(order)} gate blocks",
            )  # fmt: skip
        peep = self.const(node.input[7] if len(node.input) > 7 else "")
        if (
            node.op_type == "LSTM"
            and len(node.input) > 7
            and node.input[7]
            and (peep is None or np.any(peep))
        ):
            raise self.fail(node, "has peephole weights P, which torch's LSTM has not")
        for index, what in ((5, "initial_h"), (6, "initial_c")):
            if (
                len(node.input) > index
                and node.input[index]
                and not self.is_zero(node.input[index])
            ):
                raise self.fail(
                    node, f"starts from an {what} that is not zero (a graph input or computed "
                    "state); streamlstm streams start from zero state",
                )  # fmt: skip
        parts = (w[0], r[0], b[0, :gh], b[0, gh:])
        tensors = [reorder_gates(torch.from_numpy(np.array(p, np.float32)), order) for p in parts]
        return tensors[0], tensors[1], tensors[2], tensors[3]

    def is_zero(self, name: str) -> bool:
        """Whether tensor ``name`` is all zeros: a constant, or zeros made by
        ConstantOfShape and only reshaped, sliced or copied after."""
        value = self.const(name)
        if value is not None:
            return not np.any(value)
        node = self.producers.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            fill = _attrs(node).get("value")
            if fill is None:
                return True
            from onnx import numpy_helper

            return not np.any(numpy_helper.to_array(fill))
        data = {"Concat": list(node.input)}.get(node.op_type, [node.input[0]])
        moves = {"Slice", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Identity", "Cast"}
        return node.op_type in moves | {"Concat", "Tile"} and all(self.is_zero(i) for i in data)


_WHAT_IMPORTS = (
    "streamlstm imports LSTM, GRU or RNN nodes (forward) and a head of MatMul/Gemm, Add, "
    "Relu/Tanh/Sigmoid and a final Sigmoid or Softmax, with layout nodes between"
)


def _refuse_cell_options(
    graph: _Graph, node: Any, attrs: Mapping[str, Any], activations: Sequence[str]
) -> None:
    """Refuse a recurrent node's options that torch's cell of its kind has not."""
    direction = attrs.get("direction", "forward")
    if direction != "forward":
        raise graph.fail(
            node, f"runs direction={direction!r}: only a forward layer can stream (it cannot "
            "read ticks that have not arrived)",
        )  # fmt: skip
    given = [a.lower() for a in attrs.get("activations", activations)]
    if given != list(activations):
        raise graph.fail(
            node, f"uses activations {attrs['activations']}; only the defaults "
            f"({', '.join(a.capitalize() for a in activations)}) are supported",
        )  # fmt: skip
    if "clip" in attrs:
        raise graph.fail(
            node, f"clips its cell input at {attrs['clip']}, which torch's cells do not"
        )
    if attrs.get("layout", 0) != 0:
        raise graph.fail(node, "has layout=1 (batch first); export with layout=0")
    if attrs.get("input_forget", 0):
        raise graph.fail(node, "couples its input and forget gates (input_forget=1)")
    if node.op_type == "GRU" and attrs.get("linear_before_reset", 0) != 1:
        raise graph.fail(
            node, "has linear_before_reset=0: its reset gate scales the state before the "
            "recurrent product, which torch's GRU (and streamlstm) does not",
        )  # fmt: skip


@dataclass
class _Head:
    """The head's linears and activations, read node by node after the top layer."""

    graph: _Graph
    width: int
    linears: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: The activation after each linear so far ("" for none yet).
    after: list[str] = field(default_factory=list)

    def add(self, node: Any) -> None:
        op, graph = node.op_type, self.graph
        if op in ("MatMul", "Gemm"):
            weight, bias = self.linear(node)
            if weight.shape[1] != self.width:
                raise graph.fail(node, f"takes {weight.shape[1]} inputs, not {self.width}")
            self.linears.append((weight, bias))
            self.after.append("")
            self.width = int(weight.shape[0])
        elif op == "Add":
            const = next(c for c in map(graph.const, node.input) if c is not None)
            if not self.linears or self.after[-1]:
                raise graph.fail(node, "adds a constant that is not a linear layer's bias")
            if const.size not in (1, self.width) or const.size != np.prod(const.shape[-1:]):
                raise graph.fail(node, f"adds a constant of shape {list(const.shape)}")
            weight, bias = self.linears[-1]
            self.linears[-1] = (
                weight,
                bias + torch.from_numpy(np.array(const, np.float32)).ravel(),
            )
        elif op in ("Relu", "Tanh", "Sigmoid", "Softmax"):
            if not self.linears or self.after[-1]:
                raise graph.fail(node, "is not between or after linear layers")
            if op == "Softmax":
                rank = len(self.graph.graph.output[0].type.tensor_type.shape.dim)
                if int(_attrs(node).get("axis", -1)) % max(rank, 1) != max(rank, 1) - 1:
                    raise graph.fail(node, "is not taken across the outputs (the last axis)")
            self.after[-1] = op.lower()
        elif op not in _LAYOUT | _PICK:
            raise graph.fail(node, "is not supported in the head: " + _WHAT_IMPORTS)

    def linear(self, node: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A MatMul's or Gemm's ``(weight [out, in], bias [out])``."""
        attrs, graph = _attrs(node), self.graph
        b = graph.const(node.input[1])
        if b is None or b.ndim != 2 or graph.const(node.input[0]) is not None:
            raise graph.fail(node, "does not multiply by a constant 2-D weight on the right")
        if attrs.get("transA", 0):
            raise graph.fail(node, "transposes its input (transA=1)")
        b = b.T if attrs.get("transB", 0) else b  # [in, out]
        weight = torch.from_numpy(np.array(b.T * attrs.get("alpha", 1.0), np.float32))
        c = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = np.zeros(b.shape[1], np.float32) if c is None else c * attrs.get("beta", 1.0)
        bias = np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (b.shape[1],))
        return weight.contiguous(), torch.from_numpy(np.array(bias))

    def finish(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str, str]:
        """The linears, the one activation between them and the last one's activation."""
        if not self.linears:
            raise ConfigError(f"{self.graph.filename}: no linear head after the recurrent layers")
        between = set(a or "linear" for a in self.after[:-1])
        if len(between) > 1:
            raise ConfigError(
                f"{self.graph.filename}: the head mixes activations {sorted(between)}; a "
                "streamlstm head uses one"
            )
        last = self.after[-1] or "linear"
        if last not in ("linear", "sigmoid", "softmax"):
            raise ConfigError(
                f"{self.graph.filename}: the head ends in {last.capitalize()}; a streamlstm "
                "model's outputs end linear, in Sigmoid or in Softmax"
            )
        return self.linears, between.pop() if between else "relu", last
