"""Signal patterns of a model's layers, estimated from training data (Kindermans et al. 2018).

Kindermans, Schütt, Alber, Müller, Erhan, Kim, Dähne, "Learning how to explain neural networks:
PatternNet and PatternAttribution", ICLR 2018, https://arxiv.org/abs/1705.05598.

For a linear neuron y = wᵀx the weight w is a filter: it must cancel the distractors in x as well as
pick up the signal, so it is not the direction in which the signal lies. The *pattern* a is that
direction, estimated from data so that the signal estimate S(x) = a·y leaves a distractor x − S(x)
uncorrelated with y. Per unit (``roar.attribution.pattern_graph``: a conv/linear layer with its
BatchNorm folded in, or a residual add, followed by a ReLU) and per output channel:

* **linear estimator** ``a = cov(x, y) / (wᵀ cov(x, y))``, over all samples; since y = wᵀx + b,
  wᵀcov(x, y) = var(y), so this is the paper's a = cov(x, y)/σ²_y (its S_a), written so that wᵀa = 1
  holds exactly.
* **two-component estimator** (the paper's S_{a+-}, for ReLU units)
  ``a₊ = (E₊[x y] − E₊[x] E[y]) / (wᵀE₊[x y] − wᵀE₊[x] E[y])``, E₊ over the samples with y > 0, E over all
  samples. This is the paper's printed formula, which follows from asking the whole-data covariance
  cov(x, y) to be explained by the signal in each regime; iNNvestigate's ``relu`` patterns use the
  positive regime's own mean E₊[y] instead (the covariance within the regime). Both are invariant to the
  bias, so y may include it. The negative regime's a₋ is never needed: the ReLU passes no gradient there.

Here x is the unit's input: for a convolution the unfolded input patch at each output position (every
position of every image is a sample), for a residual add the concatenation of the branch's patch and the
skip. Channels that are never positive (dead units) or whose denominator vanishes get a zero pattern.

Which estimator each method uses: PatternAttribution and PGIG use a₊ (PatternAttribution is defined with
S_{a+-}); PatternNet defaults to the linear a, as the project's algorithm notes state it ("PatternNet
backpropagates with a in place of w"), and takes ``estimator: two_component`` for the estimator the
paper recommends for ReLU networks (iNNvestigate's default). Both are estimated in one pass and stored
together.

**Estimation** streams over batches of training images: per unit, float64 sums Σy, Σx, Σ1[y>0],
Σ y·x, Σ 1[y>0]·x and Σ 1[y>0]·y·x (three C×D matrices from one matrix product per chunk of rows, rows
chunked so that memory stays bounded whatever the batch). Sums add, so any split of the data into
batches gives the same patterns up to float64 rounding, and ``state_dict``/``load_state_dict`` let a
killed estimation resume from its last checkpoint (``roar.stages.patterns``).

**Storage**: ``save_patterns`` writes an HDF5 file atomically (``roar.core.atomic``): per unit its two
patterns [C, D] float64, the share of positive samples per channel and the norm of its folded weight;
in the header the architecture signature, the inputs the patterns were estimated from (model hash,
dataset fingerprint, samples) and a content digest, which the extraction stage records.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from roar.attribution.engine import frozen
from roar.attribution.pattern_graph import Structure, Unit, analyse, patches, reconstruct, rewrite
from roar.core.atomic import atomic_path
from roar.core.errors import RoarError

FORMAT = "roar-patterns"
FORMAT_VERSION = 1
ESTIMATORS = ("linear", "two_component")
ROW_BUDGET = 4_000_000  # float64 elements of one chunk of unfolded inputs (32 MB)
WEIGHT_TOLERANCE = 1e-3  # relative difference of a unit's weight norm that still counts as the same model


# ---------------------------------------------------------------------------------------------- the patterns


@dataclass
class UnitPatterns:
    """One unit's patterns: ``linear`` (a) and ``two_component`` (a₊), each [C, D] float64, with the share
    of samples for which each channel was positive and the norm of the unit's folded weight."""

    name: str
    linear: torch.Tensor = field(repr=False)
    two_component: torch.Tensor = field(repr=False)
    positive: torch.Tensor = field(repr=False)
    weight_norm: float = 0.0

    def pattern(self, estimator: str) -> torch.Tensor:
        return self.linear if estimator == "linear" else self.two_component


@dataclass
class Patterns:
    """A model's patterns, matched to it by ``signature`` (its units' names, kinds and shapes) and by each
    unit's weight norm. ``info`` holds what they were estimated from (``inputs``) and how many samples."""

    signature: list[dict]
    units: list[UnitPatterns]
    info: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 (16 hex digits) over the signature and every pattern: what results computed with them record."""
        h = hashlib.sha256(json.dumps(self.signature, sort_keys=True).encode())
        for unit in self.units:
            for array in (unit.linear, unit.two_component):
                h.update(np.ascontiguousarray(array.cpu().numpy(), dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def check(self, structure: Structure, who: str) -> None:
        """RoarError unless these patterns were estimated for this architecture and these weights."""
        mine, theirs = self.signature, structure.signature()
        hint = "estimate them for this model ('roar patterns' in its run)"
        if len(mine) != len(theirs):
            raise RoarError(
                f"{who}: the patterns were estimated for another architecture ({len(mine)} layers followed by a "
                f"ReLU, this model has {len(theirs)}); {hint}"
            )
        for i, (old, new) in enumerate(zip(mine, theirs)):
            if old != new:
                raise RoarError(
                    f"{who}: the patterns were estimated for another architecture (layer {i + 1} is "
                    f"{_term_text(old)} in the patterns, {_term_text(new)} in this model); {hint}"
                )
        for unit, stored in zip(structure.units, self.units):
            norm = float(unit.weight.norm())
            if not math.isclose(norm, stored.weight_norm, rel_tol=WEIGHT_TOLERANCE):
                raise RoarError(
                    f"{who}: the patterns were estimated for other weights of this architecture (layer "
                    f"{unit.name}: weight norm {stored.weight_norm:.6g}, this model's {norm:.6g}); {hint}"
                )


def _term_text(unit: dict) -> str:
    terms = " + ".join(f"{kind} {name} {'x'.join(map(str, shape))}" for kind, name, shape, _ in unit["terms"])
    return f"'{unit['name']}' ({terms})"


# ---------------------------------------------------------------------------------------------- estimation


class _Sums:
    """The streaming float64 sums of one unit."""

    KEYS = ("n", "z", "s", "positive", "products")

    def __init__(self, channels: int, width: int, device: torch.device):
        f64 = {"dtype": torch.float64, "device": device}
        self.n = torch.zeros((), **f64)  # samples (positions × images)
        self.z = torch.zeros(width, **f64)  # Σ x
        self.s = torch.zeros(channels, **f64)  # Σ y
        self.positive = torch.zeros(channels, **f64)  # Σ 1[y > 0]
        self.products = torch.zeros(3, channels, width, **f64)  # Σ y x, Σ 1[y>0] x, Σ 1[y>0] y x

    def add(self, z: torch.Tensor, s: torch.Tensor) -> None:
        """Rows of inputs z [R, D] and outputs s [R, C], float64."""
        m = (s > 0).to(s.dtype)
        self.n += z.shape[0]
        self.z += z.sum(0)
        self.s += s.sum(0)
        self.positive += m.sum(0)
        c = s.shape[1]
        self.products += (torch.cat([s, m, m * s], 1).T @ z).view(3, c, -1)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).cpu().clone() for k in self.KEYS}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.KEYS:
            getattr(self, k).copy_(state[k])

    def patterns(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, a₊, share positive) from the sums and the unit's folded weight [C, D]."""
        n = self.n.clamp_min(1)
        mean_z, mean_s = self.z / n, self.s / n
        ys, pos_x, pos_yx = self.products
        cov = ys / n - mean_s[:, None] * mean_z[None, :]
        count = self.positive[:, None]
        seen = count > 0
        count = count.clamp_min(1)
        plus = pos_yx / count - (pos_x / count) * mean_s[:, None]
        two = torch.where(seen, _normalised(plus, weight), 0.0)
        return _normalised(cov, weight), two, self.positive / n


def _normalised(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """v / (wᵀv) per channel; zero where wᵀv vanishes (relative to |w||v|) or the result is not finite."""
    w = weight.to(v.device)
    den = (w * v).sum(1, keepdim=True)
    scale = w.norm(dim=1, keepdim=True) * v.norm(dim=1, keepdim=True)
    ok = den.abs() > 1e-9 * scale
    out = torch.where(ok, v / torch.where(ok, den, 1.0), 0.0)
    return torch.where(torch.isfinite(out), out, 0.0)


class _Recorder(torch.fx.Interpreter):
    """Runs the traced model and hands ``take`` a copy of each wanted node's value the moment it is computed
    (before an in-place ReLU or add can change it)."""

    def __init__(self, graph: torch.fx.GraphModule, wanted: set[str], take):
        super().__init__(graph)
        self.wanted, self.take = wanted, take

    def run_node(self, node):
        out = super().run_node(node)
        if node.name in self.wanted:
            self.take(node.name, out.detach().clone())
        return out


class PatternEstimator:
    """Streaming estimation of a model's patterns: ``update(images)`` per batch, ``result()`` at the end.

    ``update`` runs the model once per batch (eval mode, no gradients) and adds each unit's samples to its
    float64 sums. The first batch also checks that each unit's output is the linear function of its inputs
    that the graph says (the BatchNorm folding included), so a model the analysis misreads is an error
    instead of wrong patterns.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.structure = analyse(model)
        device = next(model.parameters()).device
        self.device = torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS
        self.sums = {u.name: _Sums(u.channels, u.width, self.device) for u in self.structure.units}
        self.images = 0
        self.checked = False
        needed: dict[str, int] = {}
        for unit in self.structure.units:
            for name in [t.source for t in unit.terms] + [unit.pre]:
                needed[name] = needed.get(name, 0) + 1
        self._needed = needed

    @property
    def units(self) -> list[Unit]:
        return self.structure.units

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Add a batch of images (in the model's input space: [0, 1] for a ``Classifier``)."""
        values: dict[str, torch.Tensor] = {}
        left = dict(self._needed)
        by_pre = {u.pre: u for u in self.units}

        def take(name: str, value: torch.Tensor) -> None:
            values[name] = value
            unit = by_pre.get(name)
            if unit is None:
                return
            self._add(unit, [values[t.source] for t in unit.terms], value)
            for used in [t.source for t in unit.terms] + [unit.pre]:
                left[used] -= 1
                if left[used] == 0:
                    values.pop(used, None)

        with frozen(self.model):
            _Recorder(self.structure.graph, set(self._needed), take).run(images)
        self.images += len(images)
        self.checked = True

    def _add(self, unit: Unit, inputs: list[torch.Tensor], s: torch.Tensor) -> None:
        if not self.checked:
            self._check(unit, inputs, s)
        n, c = s.shape[0], s.shape[1]
        s = s.reshape(n, c, -1)
        positions = s.shape[2]
        per = max(1, ROW_BUDGET // (positions * unit.width))
        for i in range(0, n, per):
            z = torch.cat([patches(t, x[i : i + per], positions) for t, x in zip(unit.terms, inputs)], 1)
            rows = z.transpose(1, 2).reshape(-1, unit.width).to(self.device, torch.float64)
            out = s[i : i + per].transpose(1, 2).reshape(-1, c).to(self.device, torch.float64)
            self.sums[unit.name].add(rows, out)

    def _check(self, unit: Unit, inputs: list[torch.Tensor], s: torch.Tensor) -> None:
        expected = reconstruct(unit, [x[:4] for x in inputs])
        got = s[:4].detach().cpu().double()
        if expected.shape != got.shape:
            raise RoarError(
                f"patterns: unit {unit.name}: its output is {tuple(got.shape)}, its terms give {tuple(expected.shape)}"
            )
        error = (expected - got).abs().max().item()
        scale = got.abs().max().item() + 1e-6
        if error > 1e-3 * scale:
            raise RoarError(
                f"patterns: the input of the ReLU after {unit.name} is not the linear function of its layers that "
                f"the model's graph shows (difference {error:.2g} of {scale:.2g}); this model is not supported"
            )

    def state_dict(self) -> dict:
        return {"images": self.images, "sums": {name: s.state() for name, s in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.images = int(state["images"])
        for name, sums in self.sums.items():
            sums.load(state["sums"][name])
        self.checked = True

    def result(self, info: dict | None = None) -> Patterns:
        units = []
        for unit in self.units:
            linear, two, positive = self.sums[unit.name].patterns(unit.weight)
            units.append(UnitPatterns(unit.name, linear.cpu(), two.cpu(), positive.cpu(), float(unit.weight.norm())))
        info = {"images": self.images, **(info or {})}
        return Patterns(self.structure.signature(), units, info)


def estimate_patterns(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64, info=None):
    """The patterns of ``model`` from ``images`` (one tensor, taken in batches, or an iterable of batches)."""
    estimator = PatternEstimator(model)
    batches = (
        (images[i : i + batch_size] for i in range(0, len(images), batch_size)) if torch.is_tensor(images) else images
    )
    for batch in batches:
        estimator.update(batch)
    return estimator.result(info)


# ---------------------------------------------------------------------------------------------- the backward pass


def pattern_model(model: nn.Module, patterns: Patterns, rule: str, estimator: str, who: str) -> nn.Module:
    """``model`` whose gradients use the patterns: ``rule="net"`` takes the pattern in place of each unit's
    weight (PatternNet), ``rule="attribution"`` weight ⊙ pattern (PatternAttribution). The forward pass and
    its ReLU gates are the model's own. RoarError if the patterns belong to another architecture or weights."""
    structure = analyse(model)
    patterns.check(structure, who)
    backs = {}
    for unit, stored in zip(structure.units, patterns.units):
        a = stored.pattern(estimator)
        per_term = []
        for term, cols in unit.slices():
            part = a[:, cols]
            if rule == "attribution":
                part = torch.diagonal(part) if term.kind == "identity" else unit.weight[:, cols] * part
            per_term.append(part)
        backs[unit.name] = per_term
    return rewrite(structure, backs)


# ---------------------------------------------------------------------------------------------- the file


def save_patterns(path: str | Path, patterns: Patterns) -> None:
    """Write ``patterns`` to an HDF5 file, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp.h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["signature"] = json.dumps(patterns.signature)
        f.attrs["info"] = json.dumps(patterns.info, default=str)
        f.attrs["digest"] = patterns.digest
        group = f.create_group("units")
        for i, unit in enumerate(patterns.units):
            g = group.create_group(f"{i:04d}")
            g.attrs["name"] = unit.name
            g.attrs["weight_norm"] = unit.weight_norm
            for key in ("linear", "two_component", "positive"):
                g.create_dataset(key, data=getattr(unit, key).cpu().numpy().astype(np.float64))
        f.attrs["complete"] = True


def load_patterns(path: str | Path, rerun: str = "roar patterns") -> Patterns:
    """The patterns in ``path``; a one-line RoarError for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise RoarError(f"no patterns at {path}: run '{rerun}' first")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise RoarError(f"{path} is not a roar patterns file; delete it or use another path")
            if int(f.attrs["format_version"]) > FORMAT_VERSION:
                raise RoarError(f"{path} has patterns format {int(f.attrs['format_version'])}; upgrade roar")
            if not f.attrs.get("complete", False):
                raise ValueError("not completely written")
            units = []
            for key in sorted(f["units"]):
                g = f["units"][key]
                arrays = {k: torch.from_numpy(g[k][()]) for k in ("linear", "two_component", "positive")}
                units.append(UnitPatterns(str(g.attrs["name"]), weight_norm=float(g.attrs["weight_norm"]), **arrays))
            patterns = Patterns(json.loads(f.attrs["signature"]), units, json.loads(f.attrs["info"]))
            stored = f.attrs["digest"]
    except RoarError:
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RoarError(f"{path} is damaged ({text}); delete it and rerun '{rerun}'") from None
    if patterns.digest != stored:
        raise RoarError(f"{path} is damaged (its patterns do not match their digest); delete it and rerun '{rerun}'")
    return patterns
