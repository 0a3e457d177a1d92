"""Where PatternNet and PatternAttribution change a model: its linear layers that feed a ReLU.

The model is traced into a ``torch.fx`` graph once per call (30 ms for ResNet8), and read as a list of
*units*. A unit is one ReLU together with the linear function of the model's tensors it rectifies,

    s = Σ_t W_t z_t + b,        ReLU(s),

where each *term* is a ``Conv2d`` or ``Linear`` (an eval-mode ``BatchNorm`` right after it folded in:
W = γ/σ · W_conv, b = γ/σ · (b_conv − μ) + β) or an *identity*: a tensor added as it is. A plain layer
followed by a ReLU is a unit of one term (MLP layers, ResNet8's stem and the first convolution of each
block).

**Residual adds.** ``relu(bn2(conv2(h)) + skip)`` is one unit of two terms: the block's last
convolution and the skip, which is either the block's input (an identity term, weight I) or the 1×1
downsampling convolution with its BatchNorm. The ReLU after the add rectifies the *sum*, so the sum is
the unit's output y: its positive regime (y > 0) is where gradients pass, and its pattern is estimated
over the concatenated input [patch of h, skip], normalised once over both parts (wᵀa = 1 with w the
concatenated weight). Estimating the branch alone against its own output would describe a quantity that
no ReLU sees, and would leave the skip, through which most of a ResNet's signal flows, without a pattern.
In the backward pass each term then uses its slice of the unit's pattern: the convolutions their
slices in place of their weights, an identity skip its C×C slice (PatternNet: a 1×1 convolution with the
pattern; PatternAttribution: I ⊙ a, a per-channel scale).

A layer not followed by a ReLU (the classifier, a convolution whose output also feeds something else)
keeps its weights. A ReLU is reached through ``Identity`` and ``Dropout`` modules (eval mode), and a
term only through nodes whose single user is the next step of that path, so a pattern never changes the
gradient of another branch. Grouped convolutions and non-zero padding modes are refused.

``pattern_model(model, patterns, which)`` returns the traced graph with each term routed through
``_PatternGrad``: the forward is the model's own modules (bit-identical logits), the backward takes the
term's pattern (or weight ⊙ pattern) in place of its weight. The ReLUs are untouched, so the forward
pass's gates are kept. The model itself is never modified.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from roar.core.errors import RoarError

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Term:
    """One summand of a unit: a convolution, a linear layer or an identity (a tensor added as it is)."""

    kind: str  # "conv", "linear" or "identity"
    name: str  # the module's qualified name; for an identity, the graph node that is added
    node: str  # the graph node of the layer; for an identity, the add that takes it
    source: str  # the graph node whose value is the term's input z
    bn: str | None = None  # graph node of a BatchNorm folded into the layer
    shape: tuple[int, ...] = ()  # the weight's shape: [C, Cin, kh, kw], [C, D] or [C, C]
    conv: tuple | None = None  # (stride, padding, dilation) of a convolution

    @property
    def width(self) -> int:
        """Columns of the unit's concatenated weight that belong to this term."""
        return math.prod(self.shape[1:])

    def describe(self) -> list:
        """What the term is, for the architecture signature."""
        return [self.kind, self.name, list(self.shape), None if self.conv is None else [list(c) for c in self.conv]]


@dataclass
class Unit:
    """A ReLU and the terms it rectifies; ``weight`` [C, D] and ``bias`` [C] (float64) are the folded
    linear function s = weight · concat(z_t) + bias."""

    name: str  # the first layer's module name: how the unit is called in files and messages
    relu: str  # graph node of the ReLU
    pre: str  # graph node whose value is s, the ReLU's input
    terms: tuple[Term, ...]
    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor = field(repr=False)

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    def slices(self) -> list[tuple[Term, slice]]:
        """Each term with its columns in the concatenated weight."""
        out, start = [], 0
        for term in self.terms:
            out.append((term, slice(start, start + term.width)))
            start += term.width
        return out

    def describe(self) -> dict:
        return {"name": self.name, "terms": [t.describe() for t in self.terms]}


@dataclass
class Structure:
    """A model's traced graph and its units, in the order the forward pass reaches them."""

    graph: fx.GraphModule
    units: list[Unit]

    def signature(self) -> list[dict]:
        """The architecture as patterns are matched to it: names, kinds and shapes of every unit's terms."""
        return json.loads(json.dumps([u.describe() for u in self.units]))


# ---------------------------------------------------------------------------------------------- reading a graph


def _module(node: fx.Node, modules: dict) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(_module(node, modules), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ADD_METHODS


def _transparent(node: fx.Node, modules: dict) -> bool:
    return isinstance(_module(node, modules), TRANSPARENT)


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _back_through_transparent(node: fx.Node, modules: dict) -> fx.Node:
    while _transparent(node, modules) and _single_user(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _layer(node: fx.Node, modules: dict) -> tuple[fx.Node, fx.Node | None] | None:
    """(layer node, folded BatchNorm node or None) if ``node`` is a Conv2d/Linear, possibly behind a
    BatchNorm with running statistics, that feeds nothing else; else None."""
    node = _back_through_transparent(node, modules)
    if not _single_user(node):
        return None
    bn = None
    module = _module(node, modules)
    if isinstance(module, BATCHNORMS) and module.running_mean is not None:
        bn, node = node, _back_through_transparent(node.args[0], modules)
        if not _single_user(node):
            return None
        module = _module(node, modules)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return node, bn
    return None


def _terms(node: fx.Node, modules: dict) -> list | None:
    """The terms of the linear function that ``node`` computes: [(kind, node, bn, add)], or None. A summand
    that is not a layer is an identity term; a constant (``get_attr``) makes the whole sum unsupported."""
    found = _layer(node, modules)
    if found is not None:
        layer, bn = found
        kind = "conv" if isinstance(_module(layer, modules), nn.Conv2d) else "linear"
        return [(kind, layer, bn, None)]
    inner = _back_through_transparent(node, modules)
    if _is_add(inner) and _single_user(inner):
        terms = []
        for arg in inner.args:
            if not isinstance(arg, fx.Node) or arg.op == "get_attr":
                return None
            sub = _terms(arg, modules)
            terms += sub if sub is not None else [("identity", arg, None, inner)]
        return terms
    return None


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise RoarError(
            f"patterns: {name} is a grouped convolution (groups={conv.groups}), which pattern estimation "
            "does not support"
        )
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise RoarError(
            f"patterns: {name} pads with mode '{conv.padding_mode}' / padding {conv.padding!r}; pattern "
            "estimation supports zero padding given as numbers"
        )


def _folded(module: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight and bias in float64 on the CPU, with an eval-mode BatchNorm after it folded in."""

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().double()

    w = f64(module.weight)
    b = f64(module.bias) if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if bn is not None:
        gamma = f64(bn.weight) if bn.weight is not None else 1.0
        beta = f64(bn.bias) if bn.bias is not None else 0.0
        scale = gamma / torch.sqrt(f64(bn.running_var) + bn.eps)
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b = (b - f64(bn.running_mean)) * scale + beta
    return w, b


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx graph (sharing the model's modules); a RoarError if it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RoarError(
            f"patterns: cannot trace {type(model).__name__} into a graph ({text}); PatternNet, PatternAttribution "
            "and PGIG need a model that torch.fx can trace"
        ) from None


def _unit(relu: fx.Node, found: list, modules: dict) -> Unit | None:
    """The unit of a ReLU from its terms; None if its layers disagree on the number of channels."""
    terms, weights, biases = [], [], []
    for kind, node, bn_node, add in found:
        if kind == "identity":
            terms.append(Term("identity", node.name, add.name, node.name))
            weights.append(None)
            continue
        module = _module(node, modules)
        if kind == "conv":
            _check_conv(node.target, module)
        w, b = _folded(module, None if bn_node is None else _module(bn_node, modules))
        conv = (tuple(module.stride), tuple(module.padding), tuple(module.dilation)) if kind == "conv" else None
        bn = None if bn_node is None else bn_node.name
        terms.append(Term(kind, node.target, node.name, node.args[0].name, bn, tuple(w.shape), conv))
        weights.append(w.reshape(w.shape[0], -1))
        biases.append(b)
    present = [w for w in weights if w is not None]
    channels = present[0].shape[0]
    if any(w.shape[0] != channels for w in present):
        return None
    eye = torch.eye(channels, dtype=torch.float64)
    terms = [t if t.kind != "identity" else Term(**{**vars(t), "shape": (channels, channels)}) for t in terms]
    weight = torch.cat([eye if w is None else w for w in weights], 1)
    name = next(t.name for t in terms if t.kind != "identity")
    return Unit(name, relu.name, relu.args[0].name, tuple(terms), weight, sum(biases))


def analyse(model: nn.Module) -> Structure:
    """The units of ``model``: every ReLU whose input is a linear function of conv/linear layers (and
    added tensors), with the folded weight of each. RoarError if there is none."""
    graph = trace(model)
    modules = dict(graph.named_modules())
    units: list[Unit] = []
    for node in graph.graph.nodes:
        if not _is_relu(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        found = _terms(node.args[0], modules)
        if found is None or all(kind == "identity" for kind, *_ in found):
            continue
        unit = _unit(node, found, modules)
        if unit is not None:
            units.append(unit)
    names = [u.name for u in units]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RoarError(
            f"patterns: layer {repeated[0]} is called more than once in {type(model).__name__}'s forward pass; "
            "a layer shared between places cannot have one pattern per place"
        )
    if not units:
        raise RoarError(
            f"patterns: {type(model).__name__} has no convolution or linear layer followed by a ReLU; "
            "PatternNet, PatternAttribution and PGIG need one (with none they would be the gradient)"
        )
    return Structure(graph, units)


# ---------------------------------------------------------------------------------------------- term inputs


def patches(term: Term, z: torch.Tensor, positions: int) -> torch.Tensor:
    """The term's input as columns: [N, width, positions] (a convolution's unfolded patches)."""
    n = z.shape[0]
    if term.kind == "conv":
        stride, padding, dilation = term.conv
        out = F.unfold(z, term.shape[2:], dilation=dilation, padding=padding, stride=stride)
    elif term.kind == "linear":
        if z.ndim != 2:
            raise RoarError(f"patterns: {term.name} takes inputs of shape {tuple(z.shape)}; only [N, D] is supported")
        out = z.reshape(n, -1, 1)
    else:
        out = z.reshape(n, z.shape[1], -1)
    if out.shape[1:] != (term.width, positions):
        raise RoarError(
            f"patterns: the input of {term.name} gives {tuple(out.shape[1:])} columns and positions, the unit's "
            f"output has {term.width} and {positions}"
        )
    return out


def reconstruct(unit: Unit, inputs: list[torch.Tensor]) -> torch.Tensor:
    """s = Σ_t W_t z_t + b from the terms' inputs, in float64 on the CPU: the unit's output as the folded
    weights give it."""
    total = 0
    for (term, cols), z in zip(unit.slices(), inputs):
        w = unit.weight[:, cols]
        z = z.detach().cpu().double()
        if term.kind == "conv":
            stride, padding, dilation = term.conv
            total = total + F.conv2d(z, w.reshape(term.shape), None, stride, padding, dilation)
        elif term.kind == "linear":
            total = total + z @ w.T
        else:
            total = total + z
    shape = (1, -1) + (1,) * (total.ndim - 2)
    return total + unit.bias.view(shape)


# ---------------------------------------------------------------------------------------------- the backward pass


class _PatternGrad(torch.autograd.Function):
    """The term's forward (its own modules); its backward with ``term.back`` in place of its weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, term: _Term) -> torch.Tensor:
        ctx.term, ctx.shape = term, x.shape
        return term.run(x) if term.run is not None else x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.term.input_grad(grad, ctx.shape), None


class _Term(nn.Module):
    """A term of a unit in the rewritten graph: runs ``run`` (the layer, then its BatchNorm; nothing for
    an identity) and back-propagates with ``back``: a weight-shaped tensor, or a per-channel scale for
    PatternAttribution through an identity."""

    def __init__(self, term: Term, run: nn.Module | None, back: torch.Tensor):
        super().__init__()
        self.term = term
        self.run = run
        self.register_buffer("back", back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PatternGrad.apply(x, self)

    def input_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        back = self.back.to(grad.dtype)
        kind = self.term.kind
        if kind == "conv":
            stride, padding, dilation = self.term.conv
            return torch.nn.grad.conv2d_input(shape, back, grad, stride, padding, dilation)
        if kind == "linear":
            return grad @ back
        if back.ndim == 1:  # identity ⊙ pattern: the diagonal
            return grad * back.view(1, -1, *([1] * (grad.ndim - 2)))
        return torch.einsum("cj,nc...->nj...", back, grad)


def rewrite(structure: Structure, backs: dict[str, list[torch.Tensor]]) -> fx.GraphModule:
    """The structure's graph with every term of every unit in ``backs`` (unit name → a backward tensor per
    term, float64) routed through ``_PatternGrad``. The graph is a fresh one (``analyse`` traces anew), so
    rewriting it leaves the model as it was."""
    gm = structure.graph
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    weight = next(p for p in gm.parameters())
    count = 0
    for unit in structure.units:
        for term, back in zip(unit.terms, backs[unit.name]):
            back = back.to(device=weight.device, dtype=weight.dtype)
            name = f"_pattern_{count}"
            count += 1
            if term.kind == "identity":
                add, source = nodes[term.node], nodes[term.source]
                gm.add_submodule(name, _Term(term, None, back))
                with gm.graph.inserting_before(add):
                    wrapped = gm.graph.call_module(name, (source,))
                add.replace_input_with(source, wrapped)
                continue
            layer = nodes[term.node]
            run = modules[layer.target]
            if term.bn is not None:
                bn = nodes[term.bn]
                run = nn.Sequential(run, modules[bn.target])
                bn.replace_all_uses_with(bn.args[0])
                gm.graph.erase_node(bn)
            gm.add_submodule(name, _Term(term, run, back.reshape(term.shape)))
            layer.target = name
    gm.graph.lint()
    gm.recompile()
    return gm
