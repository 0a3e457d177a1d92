"""Speed of roar's metrics against Quantus 0.6's, on the CPU, in one process, on the same inputs.

    python -m benchmarks.metrics [--quick] [--write docs/benchmarks.md]

Both sides score the same images, maps, masks and targets of the same model: a ResNet8 16/32/64
with random weights behind ``Classifier`` normalisation (CIFAR-10's mean and std), prepared as
``roar metrics`` prepares it (``prepare_model``: eval mode, BatchNorm folded, channels_last);
uniform random 32×32 images; one random square per image as its object mask; maps of
``create("gradient")`` bound as the stage binds it (``explainer``: reduced over channels by the sum
of squares, as the store reduces them); targets = the predicted classes. roar's side is
``METRICS.create(name, **params).evaluate_batch(**inputs)`` on torch tensors (one set of keywords
for every metric, as a stage passes them); Quantus's is the metric's ``__call__`` on the numpy
arrays it wants (converted beforehand, outside the timing), with ``batch_size`` the whole batch.

The parameters are those of the equality tests (tests/test_metrics_localisation.py,
tests/test_metrics_randomisation.py), so that both sides compute the same values:

* localisation (``pointing_game`` with tolerance 0, ``relevance_mass``, ``relevance_rank``,
  ``top_k_intersection`` with Quantus's k = count(fraction, P), ``auc``): Quantus with
  ``normalise=False, abs=False``; the maps are ≥ 0, so roar's clipping at 0 changes nothing;
* complexity (``sparseness``, ``complexity``, ``effective_complexity``): Quantus with
  ``normalise=False, abs=True``. Both sides get the maps divided by their own maximum (every
  metric here is scale-free in roar): Quantus's effective complexity is then roar's times P, and
  its +1e-7 in the Gini index stays negligible (raw squared gradients are of order 1e-5);
* ``model_randomisation`` (Spearman, cascading, every layer) against ``MPRT`` (Quantus 0.5 renamed
  ``ModelParameterRandomisation`` to it; the old name is a subclass that prints a notice) with
  ``layer_order="top_down"`` and the gradient as its ``explain_func``. Quantus seeds each layer's
  reset with ``torch.manual_seed(seed + 1)``; as in the test, its call runs with ``torch.manual_seed``
  replaced by roar's ``layer_seed`` of the layer it is about to reset, so both reset to the same
  weights (the replacement is a hash: it costs nothing). roar computes Spearman's similarity only
  (``similarities=["spearman"]``), as Quantus; Quantus's time includes the maps of the
  unrandomised model, which it recomputes (its ``"original"`` entry);
* ``max_sensitivity`` against ``MaxSensitivity`` with the same number of samples and the gradient as
  its ``explain_func``; Quantus's ``perturb_func`` replays roar's per-image noise (precomputed), so
  both perturb the same inputs; roar's time includes drawing it.

Measured: images/s of each side (best of ``rounds`` rounds after a warm-up, the two sides
alternating within each round) and their ratio; for randomisation and sensitivity also the
method's passes alone (``floor_call``: one call of the bound gradient per layer or sample), the
floor of any implementation that recomputes the maps through the method. Check: max
|roar − Quantus| over the images (and, for the randomisation, over the layers: Quantus's
``return_average_correlation`` averages its ``"original"`` entry in too, so the layers are
compared one by one). Targets: roar ≥ 10× Quantus's
images/s for the localisation and complexity metrics, ≥ 3× for randomisation and sensitivity, whose
time is mostly the method's own passes, the same on both sides.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.report import bench_parser, bench_run, header
from roar.attribution import Context, create, explainer
from roar.attribution.engine import prepare_model
from roar.metrics import METRICS
from roar.metrics.randomisation import layer_seed, layers_of
from roar.metrics.robustness import uniform_noise
from roar.models.base import Classifier
from roar.models.resnet8 import ResNet8
from roar.perturb.ranking import count
from roar.perturb.reduce import reduce_map

SECTION = "## Metrics: roar against Quantus"
MODEL = "ResNet8 16/32/64"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
WIDTHS = (16, 32, 64)
SIZE = 32
CLASSES = 10
MASK_SIDES = (8, 16)  # the random square's side, inclusive
TOP_K_FRACTION = 0.02  # roar's default; Quantus's k = count(fraction, P)
EPS = 1e-5  # effective complexity's threshold, the default of both
RADIUS = 0.2  # sensitivity's noise, the default of both
SEED = 0
CHECK_TOLERANCE = 1e-5  # max |roar − Quantus| for "the values agree"

# Quantus without its preprocessing (the equality tests' settings): no normalisation by the batch's
# maximum, signed maps for localisation, magnitudes (its default) for complexity.
LOCAL = {"disable_warnings": True, "normalise": False, "abs": False}
MAGNITUDE = {"disable_warnings": True, "normalise": False, "abs": True}


@dataclass(frozen=True)
class Settings:
    local_images: int  # localisation and complexity
    model_images: int  # randomisation and sensitivity (the first of the same images)
    rounds: int
    samples: int  # sensitivity's perturbed inputs per image, both sides


PRESETS = {
    "quick": Settings(local_images=8, model_images=8, rounds=1, samples=3),
    "default": Settings(local_images=128, model_images=32, rounds=5, samples=10),
}


@dataclass(frozen=True)
class Spec:
    """One metric and its Quantus counterpart."""

    name: str
    quantus: str  # the Quantus class
    family: str  # localisation, complexity, randomisation, sensitivity
    params: dict = field(default_factory=dict)  # roar's
    note: str = ""  # how the Quantus call is set up, for the table


def specs(s: Settings) -> list[Spec]:
    k = max(count(TOP_K_FRACTION, SIZE * SIZE), 1)
    return [
        Spec("pointing_game", "PointingGame", "localisation", {"tolerance": 0}, "roar `tolerance=0`"),
        Spec("relevance_mass", "RelevanceMassAccuracy", "localisation"),
        Spec("relevance_rank", "RelevanceRankAccuracy", "localisation"),
        Spec(
            "top_k_intersection",
            "TopKIntersection",
            "localisation",
            {"fraction": TOP_K_FRACTION},
            f"roar `fraction={TOP_K_FRACTION}`, Quantus `k={k}`",
        ),
        Spec("auc", "AUC", "localisation"),
        Spec("sparseness", "Sparseness", "complexity"),
        Spec("complexity", "Complexity", "complexity"),
        Spec("effective_complexity", "EffectiveComplexity", "complexity", {"eps": EPS}, "Quantus's count ÷ P"),
        Spec(
            "model_randomisation",
            "MPRT",
            "randomisation",
            {"similarity": "spearman", "similarities": ["spearman"], "seed": SEED},
            'Spearman, cascading (`layer_order="top_down"`), every layer',
        ),
        Spec(
            "max_sensitivity",
            "MaxSensitivity",
            "sensitivity",
            {"samples": s.samples, "radius": RADIUS, "seed": SEED},
            f"{s.samples} samples, radius {RADIUS}",
        ),
    ]


TARGETS = {"localisation": 10.0, "complexity": 10.0, "randomisation": 3.0, "sensitivity": 3.0}


# ---------------------------------------------------------------------------------------------- inputs


def square_masks(n: int, g: torch.Generator) -> torch.Tensor:
    """bool [n, SIZE, SIZE]: one random square per image."""
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        side = int(torch.randint(MASK_SIDES[0], MASK_SIDES[1] + 1, (), generator=g))
        y, x = torch.randint(0, SIZE - side + 1, (2,), generator=g).tolist()
        masks[i, y : y + side, x : x + side] = True
    return masks


def setup(n: int) -> dict:
    """The metric inputs of n random images (as ``roar.metrics.base.INPUTS``)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    model = prepare_model(Classifier(ResNet8(CLASSES, 3, WIDTHS), MEAN, STD), torch.device("cpu"), probe=images[:16])
    with torch.no_grad():
        targets = model(images).argmax(1)
    indices = torch.arange(n)
    maps = explainer(create("gradient"), "sum_squares", SEED, Context(indices=indices))(model, images, targets)
    return {
        "model": model,
        "images": images,
        "labels": torch.randint(0, CLASSES, (n,), generator=g),
        "indices": indices,
        "targets": targets,
        "maps": maps,
        "masks": square_masks(n, g),
    }


def head(inputs: dict, n: int) -> dict:
    """The first n images' inputs, with the gradient bound to them as ``roar metrics`` binds a method."""
    out = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return {**out, "explain": explainer(create("gradient"), "sum_squares", SEED, Context(indices=out["indices"]))}


def per_image_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum |value| (a zero map stays zero)."""
    top = maps.abs().amax((1, 2), keepdim=True)
    return maps / torch.where(top > 0, top, torch.ones_like(top))


def explain(model, inputs, targets, **_):
    """``create("gradient")`` as Quantus's ``explain_func``: numpy in, maps reduced as the store's out."""
    raw = create("gradient")(model, torch.from_numpy(inputs), torch.from_numpy(np.asarray(targets)))
    return reduce_map(raw, "sum_squares", inputs.shape[1]).detach().numpy()


@contextlib.contextmanager
def roar_layer_seeds(model: torch.nn.Module, seed: int):
    """``torch.manual_seed`` replaced, for Quantus's cascading call, by roar's seed of the layer it is
    about to reset (top-down), so that both sides reset every layer to the same weights."""
    pending = iter([name for name, _ in layers_of(model)][::-1])
    original = torch.manual_seed

    def replay(*_, **__):  # Quantus calls manual_seed(seed=seed + 1) once per layer
        return original(layer_seed(seed, next(pending)))

    torch.manual_seed = replay
    try:
        yield pending
    finally:
        torch.manual_seed = original


# ---------------------------------------------------------------------------------------------- the two sides


def sides(spec: Spec, inputs: dict, s: Settings) -> tuple[Callable[[], dict], Callable[[], object]]:
    """(roar's call, Quantus's call) of ``spec`` on ``inputs``; roar's returns its dict of values."""
    import quantus

    n = len(inputs["images"])
    metric = METRICS.create(spec.name, **spec.params)
    x = inputs["images"].numpy()
    y = inputs["targets"].numpy()
    common = {"model": inputs["model"], "x_batch": x, "y_batch": y, "device": "cpu", "batch_size": n}

    if spec.family in ("localisation", "complexity"):
        roar_inputs = {**inputs, "maps": per_image_max(inputs["maps"])}
        a = roar_inputs["maps"][:, None].numpy().copy()
        masks = inputs["masks"][:, None].numpy().astype(np.float32) if spec.family == "localisation" else None
        kwargs = dict(LOCAL if spec.family == "localisation" else MAGNITUDE)
        if spec.name == "top_k_intersection":
            kwargs["k"] = max(count(TOP_K_FRACTION, SIZE * SIZE), 1)
        if spec.name == "effective_complexity":
            kwargs["eps"] = EPS
        theirs = getattr(quantus, spec.quantus)(**kwargs)
        return (
            lambda: metric.evaluate_batch(**roar_inputs),
            lambda: theirs(a_batch=a, s_batch=masks, **common),
        )

    a = inputs["maps"][:, None].numpy().copy()
    if spec.family == "randomisation":
        theirs = quantus.MPRT(layer_order="top_down", seed=SEED, abs=True, normalise=True, disable_warnings=True)

        def quantus_call():
            with roar_layer_seeds(inputs["model"], SEED) as pending:
                out = theirs(a_batch=a, explain_func=explain, **common)
            if next(pending, None) is not None:
                raise RuntimeError("Quantus reset other layers than roar")
            return out

        return lambda: metric.evaluate_batch(**inputs), quantus_call

    noise = uniform_noise(inputs["images"], inputs["indices"], s.samples, RADIUS, SEED).flatten(2).numpy()
    step = {"next": 0}

    def replay(arr, **_):
        out = arr + noise[:, step["next"]]
        step["next"] += 1
        return out

    theirs = quantus.MaxSensitivity(nr_samples=s.samples, perturb_func=replay, disable_warnings=True)

    def quantus_call():
        step["next"] = 0
        out = theirs(a_batch=a, explain_func=explain, **common)
        if step["next"] != s.samples:
            raise RuntimeError(f"Quantus drew {step['next']} samples, roar {s.samples}")
        return out

    return lambda: metric.evaluate_batch(**inputs), quantus_call


def best_of(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, object]]:
    """Best wall time of each callable (and what it returned in that round), after a warm-up, alternating."""
    for fn in fns.values():
        fn()
    best: dict[str, tuple[float, object]] = {}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            out = fns[name]()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, out)
    return best


def difference(spec: Spec, ours: dict, theirs) -> float | None:
    """max |roar − Quantus| over the images (and layers); None where the definitions differ."""
    if spec.family == "randomisation":
        layers = [layer for layer in theirs if layer != "original"]
        diffs = [np.abs(ours[f"{spec.name}@{layer}"].numpy() - np.asarray(theirs[layer])).max() for layer in layers]
        mean = np.mean([np.asarray(theirs[layer]) for layer in layers], axis=0)
        diffs.append(np.abs(ours[spec.name].numpy() - mean).max())
        return float(max(diffs))
    expected = np.asarray(theirs, dtype=np.float64)
    if spec.name == "effective_complexity":
        expected = expected / (SIZE * SIZE)
    return float(np.abs(ours[spec.name].numpy().astype(np.float64) - expected).max())


# ---------------------------------------------------------------------------------------------- measure


def passes(spec: Spec, inputs: dict) -> int:
    """How many times the method runs on the whole batch: once per layer or per sample."""
    return len(layers_of(inputs["model"])) if spec.family == "randomisation" else spec.params["samples"]


def floor_call(inputs: dict, count: int) -> Callable[[], None]:
    """The method's own passes and nothing else: ``count`` calls of the bound gradient on the batch,
    the least time any implementation that recomputes the maps through the method can take."""
    model, images, targets, explain = inputs["model"], inputs["images"], inputs["targets"], inputs["explain"]

    def run():
        for _ in range(count):
            explain(model, images, targets)

    return run


def measure(s: Settings, log) -> dict:
    inputs = setup(max(s.local_images, s.model_images))
    rows = []
    for spec in specs(s):
        n = s.local_images if spec.family in ("localisation", "complexity") else s.model_images
        batch = head(inputs, n)
        roar_call, quantus_call = sides(spec, batch, s)
        calls = {"roar": roar_call, "quantus": quantus_call}
        if spec.family in ("randomisation", "sensitivity"):
            calls["passes"] = floor_call(batch, passes(spec, batch))
        r = best_of(calls, s.rounds)
        row = {
            "spec": spec,
            "images": n,
            "roar": n / r["roar"][0],
            "quantus": n / r["quantus"][0],
            "check": difference(spec, r["roar"][1], r["quantus"][1]),
            "passes": n / r["passes"][0] if "passes" in r else None,
        }
        row["ratio"] = row["roar"] / row["quantus"]
        check = "definitions differ" if row["check"] is None else f"max |roar − Quantus| {row['check']:.1e}"
        floor = "" if row["passes"] is None else f", the method's passes alone {row['passes']:.1f} images/s"
        log(
            f"{spec.name}: roar {row['roar']:.1f} images/s, Quantus {spec.quantus} {row['quantus']:.1f} images/s "
            f"({row['ratio']:.1f}×){floor}, {check}"
        )
        rows.append(row)
    layers = len(layers_of(inputs["model"]))
    return {"rows": rows, "layers": layers}


# ---------------------------------------------------------------------------------------------- report


def speed(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def check_text(value: float | None) -> str:
    if value is None:
        return "definitions differ"
    return "0" if value == 0 else f"{value:.1e}"


def floor_text(row: dict) -> str:
    """The passes' own speed and the best ratio any implementation calling the method could reach."""
    if row["passes"] is None:
        return "—"
    return f"{speed(row['passes'])} ({row['passes'] / row['quantus']:.1f}×)"


def table(rows: list[dict]) -> str:
    lines = [
        "| Metric | Quantus | Setting | Images | roar images/s | Quantus images/s | roar ÷ Quantus "
        "| passes alone, images/s (Quantus ÷ passes) | max \\|roar − Quantus\\| | Target | Met |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        spec, target = r["spec"], TARGETS[r["spec"].family]
        met = "yes" if r["ratio"] >= target else "**no**"
        lines.append(
            f"| `{spec.name}` | `{spec.quantus}` | {spec.note or '—'} | {r['images']} | {speed(r['roar'])} "
            f"| {speed(r['quantus'])} | {r['ratio']:.1f}× | {floor_text(r)} | {check_text(r['check'])} "
            f"| ≥ {target:.0f}× | {met} |"
        )
    return "\n".join(lines)


def targets_text(rows: list[dict]) -> str:
    lines = []
    for families in (("localisation", "complexity"), ("randomisation", "sensitivity")):
        chosen = [r for r in rows if r["spec"].family in families]
        target = TARGETS[families[0]]
        met = all(r["ratio"] >= target for r in chosen)
        ratios = ", ".join(f"`{r['spec'].name}` {r['ratio']:.1f}×" for r in chosen)
        lines.append(
            f"- {' and '.join(families).capitalize()}: roar ≥ {target:.0f}× Quantus's images/s: "
            f"{'met' if met else 'not met'} ({ratios})."
        )
    return "\n".join(lines)


def render(command: str, result: dict, s: Settings, load_start: float, load_end: float) -> str:
    import quantus
    import sklearn

    rows = result["rows"]
    versions = (f"quantus {quantus.__version__}", f"numpy {np.__version__}", f"scikit-learn {sklearn.__version__}")
    checked = [r["check"] for r in rows if r["check"] is not None]
    ok = all(c <= CHECK_TOLERANCE for c in checked)
    parts = [
        *header(SECTION, command, load_start, load_end, *versions),
        f"- Settings: {MODEL} with random weights behind `Classifier` normalisation (CIFAR-10 mean and std), eval "
        f"mode, prepared as `roar metrics` prepares it (`prepare_model`: BatchNorm folded, channels_last; "
        f"randomisation resets its {result['layers']} layers); uniform random {SIZE}×{SIZE} "
        f"images, {s.local_images} for the localisation and complexity metrics, the first {s.model_images} for "
        f"randomisation and sensitivity; masks: one random square per image (side {MASK_SIDES[0]}–{MASK_SIDES[1]}); "
        "maps: `gradient` bound as `roar metrics` binds a method (`roar.attribution.explainer`, reduced by the sum of "
        "squares over channels, the store's reduction), divided by each "
        "map's maximum for the localisation and complexity metrics (scale-free in roar; it keeps Quantus's "
        "+1e-7 in the Gini index negligible and makes its effective complexity count roar's share × P); targets: "
        "the predicted classes. roar: `METRICS.create(name, **params).evaluate_batch(**inputs)` on torch tensors; "
        "Quantus: the metric's `__call__` on numpy arrays converted beforehand, `batch_size` the whole batch, the "
        "equality tests' parameters (localisation `normalise=False, abs=False`; complexity `normalise=False, "
        "abs=True`). Randomisation: Quantus's `MPRT` (formerly `ModelParameterRandomisation`, now its deprecated "
        "alias) with `torch.manual_seed` replaced by roar's seed of each layer, so that both reset the same "
        "weights; the gradient as its `explain_func`; roar computes Spearman's similarity only "
        "(`similarities: [spearman]`), as Quantus does. Sensitivity: `MaxSensitivity`, the same samples, its "
        "`perturb_func` replaying roar's per-image noise. Best of "
        f"{s.rounds} round{'s' if s.rounds > 1 else ''} after a warm-up, the two sides alternating within each "
        "round.",
        f"- Check: max |roar − Quantus| over the images (randomisation: over the layers one by one and their mean; "
        "Quantus's `return_average_correlation` would average its unrandomised `original` entry in as well); "
        f"all ≤ {CHECK_TOLERANCE:.0e}: {'yes' if ok else '**no**'}.",
        "",
        table(rows),
        "",
        "Where the time goes: Quantus 0.6 computes most of these metrics on the whole batch in numpy (one "
        "`argsort` per row for the ranks, one `sort` for the Gini index), the AUC image by image (scikit-learn's "
        "`roc_curve` and `auc`), and pays a fixed cost per `__call__` (checks, preprocessing, wrapping the "
        "model). roar sorts rows with NumPy's SIMD sorts on the CPU (`roar.core.sorting`, about 10× `torch.sort`), "
        "takes the top k pixels with `topk` and breaks ties with the seeded hash of `roar.perturb.ranking` only in "
        "the images whose boundary value is shared (`top_mask`, `top_position`: the same pixels as the full "
        "ranking). Randomisation and sensitivity run the method once per layer or per sample on the whole batch, "
        "on both sides: the column *passes alone* times those calls and nothing else, the floor of any "
        "implementation that recomputes the maps through the method, and its ratio to Quantus is the most such "
        "an implementation can gain. roar spends nearly all its time there (SSIM and HOG are computed only when "
        "asked, with `similarities`; the original maps' ranks once per batch); Quantus adds its per-image "
        "similarities in scipy, its model copies and, for `MPRT`, the maps of the unrandomised model.",
        "",
        "Targets:",
        "",
        targets_text(rows),
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(
        "benchmarks.metrics", __doc__, "smoke test: 8 images, one round, 3 sensitivity samples"
    ).parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    return bench_run(
        "benchmarks.metrics", argv, args.write, lambda log: measure(s, log), lambda c, r, a, b: render(c, r, s, a, b)
    )


if __name__ == "__main__":
    raise SystemExit(main())
