"""What every registered entry promises, checked for each one: methods, fills, datasets, models.

Each registry is read when the tests are collected (``REGISTRY.names()``), never from a list kept
here, so an entry is held to these contracts the moment it is registered. For every entry:
output shape and dtype, finite values, the same result under the same seed, the same result for
an image whatever batch it is in, and the device it runs on (CUDA where a GPU exists).

Batch invariance and randomness. The extraction stage seeds one random stream per (seed, split,
method, batch start), not per image, so an image's noise (noise tunnels), reference draws
(expected gradients) or random map depend on its batch by design, and a resumed extraction
reproduces them because batches lie on a fixed grid. What does hold, and is tested, is that
given the same random numbers an image's map does not depend on the rest of its batch: the
draws of the batch run are recorded and each image alone is replayed its own slice of them.
Maps computed through the model agree to float rounding only (the matrix products block the
batch differently for 4 inputs than for 1: about 1e-7 of the map's scale); model-free maps,
fills and datasets agree bit for bit.

Cases are tiny (ResNet8 with widths [4, 8, 8], 3×8×8 images, 3 noisy copies, 4 path steps), so
the whole module runs in seconds on two CPU cores.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from helpers import full_batch, gradient_explainer, rows
from PIL import Image
from torch import nn

from roar.attribution import METHODS, Context, create
from roar.attribution.base import NEEDS, MethodConfig
from roar.attribution.noise import STATISTICS, NoiseTunnel, TunnelAlias
from roar.attribution.registry import method_class, smoothable_methods
from roar.core.errors import RoarError
from roar.data import DATASETS, build_dataset
from roar.metrics import DIRECTIONS, METRICS
from roar.metrics import NEEDS as METRIC_NEEDS
from roar.models import MODELS, Classifier, build_model
from roar.models.resnet8 import ResNet8
from roar.perturb import FILLS, ablate, build_fill

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
B, C, H, W = 4, 3, 8, 8

# ---------------------------------------------------------------------------------------------- replayed draws

# The entry points through which roar draws random numbers; a method drawing through another one
# is not replayed, and its batch-invariance test fails (it does not pass silently).
RANDOM = ("rand", "randn", "randint", "normal", "rand_like", "randn_like")


class Draws:
    """Records every random draw of a run, then replays image ``i``'s slice of each for a run on image ``i`` alone.

    A draw of the batch run and the same draw of the single-image run differ in one axis, the
    batch's (B → 1); a draw without a batch axis (one value for the whole batch) is replayed whole.
    Only draws from the global generator or from ``shared`` (the batch's generator, handed to the
    method) are replayed; a draw from a generator the method makes itself (e.g. the ``road`` fill's,
    seeded per image and sample) is left alone: it is reproducible by construction, and whether it
    makes a result batch-invariant is what the comparison of the results checks.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, shared: torch.Generator):
        self.monkeypatch = monkeypatch
        self.shared = shared
        self.original = {name: getattr(torch, name) for name in RANDOM}
        self.recorded: list[torch.Tensor] = []

    @contextlib.contextmanager
    def record(self):
        def wrap(name):
            def draw(*args, **kwargs):
                out = self.original[name](*args, **kwargs)
                if self._replayed(kwargs):
                    self.recorded.append(out)
                return out

            return draw

        with self._patched(wrap):
            yield

    @contextlib.contextmanager
    def replay(self, image: int):
        pending = iter(self.recorded)

        def wrap(name):
            def draw(*args, **kwargs):
                out = self.original[name](*args, **kwargs)  # only for the shape asked for
                if not self._replayed(kwargs):
                    return out
                batch = next(pending, None)
                if batch is None:
                    pytest.fail(f"torch.{name}: more draws for one image than for the batch")
                axes = [a for a, (u, v) in enumerate(zip(batch.shape, out.shape)) if u != v]
                if batch.ndim != out.ndim or len(axes) > 1 or (axes and out.shape[axes[0]] != 1):
                    pytest.fail(f"torch.{name}: draw {tuple(out.shape)} alone vs {tuple(batch.shape)} batched")
                return batch.narrow(axes[0], image, 1).clone() if axes else batch.clone()

            return draw

        with self._patched(wrap):
            yield

    def _replayed(self, kwargs) -> bool:
        return kwargs.get("generator") in (None, self.shared)

    @contextlib.contextmanager
    def _patched(self, wrap):
        with self.monkeypatch.context() as patch:
            for name in RANDOM:
                patch.setattr(torch, name, wrap(name))
            yield


def same_in_any_batch(alone: torch.Tensor, together: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(alone, together), f"{what}: an image's result depends on its batch"
        return
    scale = together.abs().max().clamp_min(1e-12)
    worst = ((alone - together).abs().max() / scale).item()
    assert worst < 1e-5, f"{what}: an image's result depends on its batch (max difference {worst:.1e} of the scale)"


# ---------------------------------------------------------------------------------------------- METHODS


def small_params(name: str) -> dict:
    """Few noisy copies, path steps and optimisation steps, and every input in one pass (so draws are one per batch)."""
    fields = METHODS.config_class(name).model_fields
    return {k: v for k, v in {"samples": 3, "steps": 4, "iterations": 3, "max_batch": 4096}.items() if k in fields}


def tunnel_params(base: str, statistic: str) -> dict:
    base_params = {k: v for k, v in small_params(base).items() if k != "max_batch"}
    return {"base": base, "statistic": statistic, "samples": 3, "max_batch": 4096, "base_params": base_params}


# Every registered name (aliases and noise_tunnel included), plus a tunnel composed over each base
# that declares itself smoothable, with each statistic.
METHOD_CASES = [pytest.param(name, small_params(name), id=name) for name in METHODS.names()] + [
    pytest.param("noise_tunnel", tunnel_params(base, statistic), id=f"noise_tunnel[{base},{statistic}]")
    for base in smoothable_methods()
    for statistic in STATISTICS
]


def setup_model() -> Classifier:
    """A narrow ResNet8 with non-trivial BatchNorm, the same one at every call."""
    torch.manual_seed(0)
    model = Classifier(ResNet8(num_classes=10, widths=(4, 8, 8)), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


@functools.cache
def setup_patterns():
    """The setup model's signal patterns, estimated once from random images (for methods that need them).

    Drawn with ``uniform_`` and under ``fork_rng``: a first call inside a test that records its draws
    (``Draws``) or relies on the global random state changes neither."""
    from roar.attribution.patterns import estimate_patterns

    with torch.random.fork_rng():
        images = torch.empty(64, C, H, W).uniform_(generator=torch.Generator().manual_seed(2))
        return estimate_patterns(setup_model(), images, batch_size=32)


@pytest.fixture(scope="module")
def setup():
    """(model, images, targets, masks, references): a narrow ResNet8 with non-trivial BatchNorm."""
    model = setup_model()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, C, H, W, generator=g)
    with torch.no_grad():
        targets = model(images).argmax(1)
    masks = torch.randint(0, 3, (B, H, W), generator=g).to(torch.uint8)
    references = torch.rand(5, C, H, W, generator=g)
    return model, images, targets, masks, references


def context_for(method, masks, references, rows=slice(None), drop: str | None = None) -> Context:
    """The context the extraction stage builds for ``method``: only what it declares it needs."""
    needs = method.needs - {drop}
    return Context(
        indices=torch.arange(10, 10 + B)[rows],
        masks=masks[rows] if "masks" in needs else None,
        references=references if "references" in needs else None,
        patterns=setup_patterns() if "patterns" in needs else None,
    )


@pytest.mark.parametrize("name", METHODS.names())
def test_method_declares_its_needs_and_a_strict_schema(name):
    cls = method_class(name)
    assert cls is not None and cls.name == name
    assert isinstance(cls.needs, frozenset) and cls.needs <= set(NEEDS), cls.needs
    assert isinstance(cls.smoothable, bool) and isinstance(cls.requires_model, bool)
    if cls.smoothable:
        assert not cls.needs and cls.requires_model, "a smoothable method maps noisy copies with no context"
    assert issubclass(METHODS.config_class(name), MethodConfig)
    with pytest.raises(RoarError, match=rf"{name}: no_such_key: unknown key 'no_such_key'"):
        create(name, no_such_key=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "params"), METHOD_CASES)
def test_method_output_shape_dtype_and_finite_values(setup, name, params, device):
    model, images, targets, masks, references = setup
    method = create(name, **params)
    model, images, targets = model.to(device), images.to(device), targets.to(device)
    context = context_for(method, masks.to(device), references.to(device))
    try:
        before = images.clone()
        out = method(model, images, targets, generator=torch.Generator().manual_seed(0), context=context)
    finally:
        model.cpu()
    assert out.dtype == torch.float32 and out.device == images.device
    assert out.shape in ((B, C, H, W), (B, 1, H, W)), tuple(out.shape)
    assert torch.isfinite(out).all()
    assert torch.equal(images, before), "the method changed its input images"
    assert method.passes >= (1 if method.requires_model else 0)


@pytest.mark.parametrize(("name", "params"), METHOD_CASES)
def test_method_is_deterministic_under_a_seed(setup, name, params):
    model, images, targets, masks, references = setup
    runs = []
    for _ in range(2):
        method = create(name, **params)
        context = context_for(method, masks, references)
        runs.append(method(model, images, targets, generator=torch.Generator().manual_seed(7), context=context))
    assert torch.equal(*runs)


@pytest.mark.parametrize(("name", "params"), METHOD_CASES)
def test_method_gives_an_image_the_same_map_in_any_batch(setup, monkeypatch, name, params):
    """Batch of 4 against each image alone, the image replayed its own slice of the batch's draws."""
    model, images, targets, masks, references = setup
    method = create(name, **params)
    shared = torch.Generator().manual_seed(3)
    draws = Draws(monkeypatch, shared)
    with draws.record():
        together = method(
            model,
            images,
            targets,
            generator=shared,
            context=context_for(method, masks, references),
        )
    alone = []
    for i in range(B):
        rows = slice(i, i + 1)
        draws.shared = torch.Generator().manual_seed(3)
        with draws.replay(i):
            alone.append(
                create(name, **params)(
                    model,
                    images[rows],
                    targets[rows],
                    generator=draws.shared,
                    context=context_for(method, masks, references, rows),
                )
            )
    same_in_any_batch(torch.cat(alone), together, exact=not method.requires_model, what=name)


NEEDED = [
    pytest.param(name, need, id=f"{name}-{need}")
    for name in METHODS.names()
    for need in sorted(getattr(method_class(name), "needs", ()))
]


@pytest.mark.parametrize(("name", "need"), NEEDED)
def test_method_without_what_it_needs_fails_naming_it(setup, name, need):
    model, images, targets, masks, references = setup
    method = create(name, **small_params(name))
    with pytest.raises(RoarError, match=rf"{name} needs"):
        method(model, images, targets, context=context_for(method, masks, references, drop=need))


# ---------------------------------------------------------------- noise tunnels: composition and aliases


ALIASES = [name for name in METHODS.names() if issubclass(method_class(name) or object, TunnelAlias)]


def composed(alias: NoiseTunnel) -> NoiseTunnel:
    """``noise_tunnel`` built from the definition an alias stands for."""
    return create("noise_tunnel", **alias.tunnel.model_dump())


@pytest.mark.parametrize("name", ALIASES)
def test_an_alias_is_exactly_the_tunnel_it_names(setup, name):
    model, images, targets, _, _ = setup
    alias = create(name, **small_params(name))
    tunnel = composed(alias)
    assert tunnel.shared_key() == alias.shared_key() and tunnel.passes == alias.passes
    a = alias(model, images, targets, generator=torch.Generator().manual_seed(5))
    b = tunnel(model, images, targets, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


LISTED = ["sg_ig", "ig_vargrad", "ig_smoothgrad_sq", *[n for n in METHODS.names() if n.startswith("gb_")]]


@pytest.mark.parametrize("name", LISTED)
def test_listed_tunnels_run_at_their_defaults(setup, name):
    model, images, targets, _, _ = setup
    method = create(name)
    out = method(model, images[:2], targets[:2], generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, C, H, W) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().sum() > 0
    if method.tunnel.statistic != "smoothgrad":
        assert (out >= 0).all()
    again = composed(method)(model, images[:2], targets[:2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_the_named_tunnels_are_the_papers_definitions():
    grid = {"": "gradient", "ig_": "integrated_gradients", "gb_": "guided_backprop"}
    for prefix, base in grid.items():
        for statistic in STATISTICS:
            tunnel = create(prefix + statistic).tunnel
            assert (tunnel.base, tunnel.statistic, tunnel.samples, tunnel.sigma) == (base, statistic, 25, 0.15)
    sg_ig = create("sg_ig").tunnel
    assert (sg_ig.base, sg_ig.statistic, sg_ig.samples, sg_ig.base_params["steps"]) == (
        "integrated_gradients",
        "smoothgrad",
        25,
        25,
    )
    assert create("ig_vargrad").tunnel.base_params == {"steps": 50, "baseline": "black", "rule": "gausslegendre"}


def test_smoothable_bases_are_declared_by_the_methods():
    assert {"gradient", "grad_x_input", "integrated_gradients", "guided_backprop"} <= set(smoothable_methods())
    for name in ["gradcam", "expected_gradients", "random", "sobel", "ground_truth", "noise_tunnel", "smoothgrad"]:
        assert name not in smoothable_methods()


def test_tunnel_schema_is_strict_and_suggests(setup):
    with pytest.raises(
        RoarError, match=r"noise_tunnel: base_params\.stepz: unknown key 'stepz' \(did you mean 'steps'\?\)"
    ):
        create("noise_tunnel", base="integrated_gradients", base_params={"stepz": 16})
    with pytest.raises(RoarError, match=r"base_params\.steps: Input should be greater than or equal to 1"):
        create("noise_tunnel", base="integrated_gradients", base_params={"steps": 0})
    with pytest.raises(
        RoarError, match=r"base: 'gradcam' cannot be smoothed.*smoothable methods: .*integrated_gradients"
    ):
        create("noise_tunnel", base="gradcam")
    with pytest.raises(RoarError, match=r"base: unknown attribution method 'integrated_gradiens' \(did you mean"):
        create("noise_tunnel", base="integrated_gradiens")
    with pytest.raises(RoarError, match=r"base_params\.max_batch: the tunnel's max_batch"):
        create("noise_tunnel", base_params={"max_batch": 8})
    with pytest.raises(RoarError, match=r"noise_tunnel: smaples: unknown key 'smaples' \(did you mean 'samples'\?\)"):
        create("noise_tunnel", smaples=3)
    with pytest.raises(RoarError, match=r"statistic: Input should be 'smoothgrad', 'smoothgrad_sq' or 'vargrad'"):
        create("noise_tunnel", statistic="var")
    # Defaults are spelt out: an empty base_params and the base's defaults are the same tunnel.
    assert (
        create("noise_tunnel", base="integrated_gradients").params
        == create("noise_tunnel", base="integrated_gradients", base_params={"steps": 50}).params
    )


def test_a_tunnel_is_configured_in_the_run_config_and_written_back_as_given():
    from roar.config import config_from_dict
    from roar.stages.extract import build_method

    entry = {
        "name": "ig16_vargrad",
        "method": "noise_tunnel",
        "base": "integrated_gradients",
        "statistic": "vargrad",
        "base_params": {"steps": 16},
    }
    cfg = config_from_dict({"attribution": {"methods": ["ig_vargrad", entry]}})
    alias, tunnel = (build_method(e, 32) for e in cfg.attribution.entries())
    assert cfg.model_dump(mode="json")["attribution"]["methods"] == ["ig_vargrad", entry]
    assert tunnel.base.params.steps == 16 and tunnel.tunnel.max_batch == 32 and tunnel.base.params.max_batch == 32
    assert tunnel.passes == 25 * 16 and alias.passes == 25 * 50
    with pytest.raises(RoarError, match=r"attribution.methods: \[0\] noise_tunnel: base_params.stepz: unknown key"):
        config_from_dict({"attribution": {"methods": [{**entry, "base_params": {"stepz": 16}}]}})


def test_tunnels_of_one_base_share_their_noisy_passes(setup):
    """SG, SG² and VarGrad of one base, named or composed, come from one ``compute_shared``."""
    model, images, targets, _, _ = setup
    names = ["ig_smoothgrad", "ig_smoothgrad_sq", "ig_vargrad"]
    methods = [create(n, samples=3, steps=4) for n in names]
    methods += [create("noise_tunnel", **tunnel_params("integrated_gradients", s)) for s in STATISTICS]
    assert len({m.shared_key() for m in methods}) == 1
    shared = methods[0].compute_shared(model, images, targets, generator=torch.Generator().manual_seed(2))
    for method in methods:
        alone = method(model, images, targets, generator=torch.Generator().manual_seed(2))
        assert torch.equal(method.from_shared(shared, images), alone)
    assert create("noise_tunnel", base="grad_x_input").shared_key() != create("smoothgrad").shared_key()


# ---------------------------------------------------------------- the extraction stage asks the methods


class _Stop(Exception):
    """Raised by a patched step: the stage got past the decisions under test."""


@pytest.fixture
def digits_run(tmp_path, monkeypatch, data_root):
    """A run config on digits (no masks) whose 'trained model' is a tiny untrained ResNet8."""
    from roar.config import config_from_dict
    from roar.stages import extract

    def tiny_model(cfg, dataset, device):
        torch.manual_seed(0)
        return Classifier(ResNet8(10, 3, (4, 8, 8)), dataset.mean, dataset.std), {}, tmp_path / "model.pt"

    monkeypatch.setattr(extract, "load_run_model", tiny_model)
    sampled = []
    monkeypatch.setattr(extract, "reference_images", lambda *a, **k: sampled.append(1) or torch.zeros(1, 3, 32, 32))
    monkeypatch.setattr(extract, "file_hash", lambda path: (_ for _ in ()).throw(_Stop()))

    def config(methods):
        raw = {
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "dataset": {"name": "digits", "root": str(data_root)},
        }
        return config_from_dict({**raw, "attribution": {"methods": methods}})

    return extract, config, sampled


def test_extract_refuses_a_dataset_without_the_masks_a_method_needs(digits_run):
    extract, config, _ = digits_run
    with pytest.raises(RoarError, match=r"method ground_truth needs object masks, and dataset 'digits' has none"):
        extract.run(config(["gradient", "ground_truth"]))
    methods = [{"name": "oracle", "method": "ground_truth"}, {"name": "truth", "method": "ground_truth"}]
    with pytest.raises(RoarError, match=r"method oracle \(ground_truth\), truth \(ground_truth\) need object masks"):
        extract.run(config(methods))


def test_extract_samples_references_only_when_a_method_needs_them(digits_run):
    extract, config, sampled = digits_run
    with pytest.raises(_Stop):
        extract.run(config(["gradient", "smoothgrad"]))
    assert sampled == []
    with pytest.raises(_Stop):
        extract.run(config(["gradient", {"name": "eg", "method": "expected_gradients", "samples": 2}]))
    assert sampled == [1]


# ---------------------------------------------------------------------------------------------- FILLS

MEAN = (0.4, 0.5, 0.6)


def fill_case(name: str, seed: int = 0):
    """(images, removed, context): whole 4×4 patches removed for patch fills, single pixels otherwise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, C, H, W, generator=g)
    if FILLS.config_class(name).patches:
        removed = (torch.rand(B, 1, 2, 2, generator=g) > 0.5).repeat_interleave(4, 2).repeat_interleave(4, 3)
        context = {"patch": 4}
    else:
        removed = torch.rand(B, 1, H, W, generator=g) > 0.5
        context = {}
    return images, removed.expand(B, C, H, W), {"indices": torch.tensor([7, 1, 9, 4]), **context}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FILLS.names())
def test_fill_output_shape_dtype_and_kept_positions(name, device):
    images, removed, context = fill_case(name)
    images, removed = images.to(device), removed.to(device)
    out = ablate(images, removed, build_fill(name, mean=MEAN), **context)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert torch.isfinite(out).all()
    assert torch.equal(out[~removed], images[~removed]), "a fill changed a kept position"
    assert not torch.equal(out[removed], images[removed]), "a fill left every removed position as it was"


@pytest.mark.parametrize("name", FILLS.names())
def test_fill_is_deterministic(name):
    images, removed, context = fill_case(name)
    runs = [ablate(images, removed, build_fill(name, mean=MEAN), **context) for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("name", FILLS.names())
def test_fill_gives_an_image_the_same_values_in_any_batch(name):
    """Fills with noise seed it per image (by dataset index), so here no replay is needed."""
    images, removed, context = fill_case(name)
    fill = build_fill(name, mean=MEAN)
    together = ablate(images, removed, fill, **context)
    alone = [
        ablate(images[i : i + 1], removed[i : i + 1], fill, **{**context, "indices": context["indices"][i : i + 1]})
        for i in range(B)
    ]
    same_in_any_batch(torch.cat(alone), together, exact=True, what=name)


# ---------------------------------------------------------------------------------------------- DATASETS


def write_image_folder(root):
    """Two classes, two images each, in train/ and val/: a folder (or ImageNet-style) dataset in a few KB."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (12 + 2 * i, 10, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def offline_config(name: str, root):
    """A tiny offline config of dataset ``name``, or a skip saying why there is none."""
    config = DATASETS.config_class(name)
    if name == "shapes":
        return config(root=root, train_size=10, test_size=10, image_size=16, cache=False)
    if name == "digits":
        return config(root=root, image_size=8)
    if name in ("folder", "imagenet"):
        write_image_folder(root)
        return config(root=root, resize=10, crop=8)
    if name == "cifar10":
        pytest.skip("cifar10 reads the CIFAR-10 archive (a 170 MB download); test_datasets_extra.py reads a fake one")
    return config(root=root)  # a new dataset: its defaults, read from an empty root


def built(name: str, root):
    try:
        return build_dataset(offline_config(name, root))
    except RoarError as error:  # a dataset needing files that are not there says so
        pytest.skip(f"{name} cannot be built offline from an empty folder: {error}")


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_splits_have_uint8_images_labels_and_masks_of_the_geometry(name, tmp_path):
    dataset = built(name, tmp_path)
    classes = dataset.num_classes
    assert classes >= 2 and len(dataset.mean) == len(dataset.std)
    assert all(math.isfinite(m) and 0 <= m <= 1 for m in dataset.mean) and all(s > 0 for s in dataset.std)
    for split in (dataset.train, dataset.test):
        geometry = split.geometry
        assert len(geometry) == 3 and geometry[0] == len(dataset.mean)
        n = len(split)
        assert n >= 1 and split.labels.dtype == torch.int64 and split.labels.shape == (n,)
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < classes
        rows = min(n, 3)
        images = split.read(slice(0, rows))
        # Stages move batches to their device: a dataset yields CPU tensors.
        assert images.dtype == torch.uint8 and images.shape == (rows, *geometry) and images.device.type == "cpu"
        if split.masks is not None:
            assert split.masks.dtype == torch.uint8 and split.masks.shape == (n, *geometry[1:])
            assert int(split.masks.max()) <= 2


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_is_deterministic(name, tmp_path):
    first = built(name, tmp_path / "a")
    second = built(name, tmp_path / "b")
    assert first.fingerprint() == second.fingerprint()
    for a, b in ((first.train, second.train), (first.test, second.test)):
        rows = slice(0, min(len(a), 3))
        assert torch.equal(a.read(rows), b.read(rows)) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_reads_an_image_the_same_in_any_batch(name, tmp_path):
    split = built(name, tmp_path).test
    rows = list(range(min(len(split), 4)))
    together = split.read(rows)
    for k, i in enumerate(rows):
        assert torch.equal(split.read([i])[0], together[k]) and torch.equal(split[i][0], together[k])
    assert torch.equal(split.read(slice(rows[0], rows[-1] + 1)), together)


# ---------------------------------------------------------------------------------------------- MODELS

GEOMETRY = (3, 16, 16)
SMALL_MODELS = {"resnet8": {"widths": [4, 8, 8]}, "mlp": {"hidden": [8]}}


def model_config(name: str):
    config = MODELS.config_class(name)
    fields = config.model_fields
    # No pretrained weights (resnet50's default, stated here so that no test ever downloads).
    params = {**SMALL_MODELS.get(name, {}), **({"weights": None} if "weights" in fields else {})}
    cfg = config(**params)
    assert getattr(cfg, "weights", None) is None
    return cfg


def seeded_model(name: str) -> Classifier:
    torch.manual_seed(0)
    return build_model(model_config(name), 5, GEOMETRY, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).eval()


@pytest.fixture(scope="module")
def models():
    cache: dict[str, Classifier] = {}
    return lambda name: cache.setdefault(name, seeded_model(name))


def model_inputs() -> torch.Tensor:
    return torch.rand(B, *GEOMETRY, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS.names())
def test_model_maps_images_to_finite_float32_logits(models, name, device):
    model = models(name)
    try:
        model.to(device)
        with torch.no_grad():
            logits = model(model_inputs().to(device))
    finally:
        model.cpu()
    assert isinstance(model, Classifier)
    assert logits.shape == (B, 5) and logits.dtype == torch.float32 and logits.device.type == device
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_model_is_deterministic_under_a_seed(models, name):
    again = seeded_model(name)
    model = models(name)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(model(model_inputs()), again(model_inputs()))


@pytest.mark.parametrize("name", MODELS.names())
def test_model_gives_an_image_the_same_logits_in_any_batch(models, name):
    model, x = models(name), model_inputs()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(B)])
    same_in_any_batch(alone, together, exact=False, what=name)


# ---------------------------------------------------------------------------------------------- METRICS


def on(inputs: dict, device: str) -> dict:
    out = {k: v if k == "explain" else v.to(device) for k, v in inputs.items()}
    return {**out, "explain": gradient_explainer(out["indices"])}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METRICS.names())
def test_metric_gives_finite_float_values_per_image_on_the_inputs_device(name, device):
    metric = METRICS.create(name)
    assert metric.direction in DIRECTIONS and set(metric.needs) <= set(METRIC_NEEDS)
    values = metric.evaluate_batch(**on(full_batch(), device))
    assert name in values
    for key, v in values.items():
        assert v.shape[0] == 6 and v.is_floating_point() and v.device.type == device, key
        assert torch.isfinite(v).all(), key


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_is_deterministic_and_gives_an_image_the_same_values_in_any_batch(name):
    metric = METRICS.create(name)
    inputs = full_batch()
    whole = metric.evaluate_batch(**inputs)
    again = METRICS.create(name).evaluate_batch(**full_batch())
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = metric.evaluate_batch(**rows(inputs, permutation))
    halves = [metric.evaluate_batch(**rows(inputs, slice(a, a + 3))) for a in (0, 3)]
    for key, values in whole.items():
        assert torch.equal(again[key], values), key
        assert torch.equal(shuffled[key], values[permutation]), key
        assert torch.equal(torch.cat([h[key] for h in halves]), values), key
        for i in range(6):
            alone = metric.evaluate_batch(**rows(inputs, slice(i, i + 1)))[key]
            assert torch.equal(alone, values[i : i + 1]), key
