"""Speed of roar's attribution engine against Captum, on the CPU, measured in one process.

    python -m benchmarks.attribution [--quick | --full] [--write docs/benchmarks.md]

Everything runs on a ResNet8 behind ``Classifier`` normalisation, in eval mode, with random
weights (speed does not depend on them), and on fixed random 32×32 images; every comparison uses
the same model (prepared as the extraction stage prepares it), inputs, targets and chunk size
(inputs per forward/backward pass: roar's default for the CPU unless ``--max-batch`` sets it):

1. Integrated Gradients, 50 Gauss–Legendre steps: roar's ``integrated_gradients`` against Captum's
   ``IntegratedGradients`` (``internal_batch_size`` = the same chunk) and against the floor.
2. SmoothGrad, 25 samples: roar's ``smoothgrad`` against Captum's ``NoiseTunnel(Saliency)``
   (``nt_samples_batch_size`` = the same number of copies per pass).
3. The ROAR paper's grid {gradient, IG, guided backprop} × {base, SmoothGrad, SmoothGrad², VarGrad}:
   roar's 12 methods extracted together as the extraction stage does (each distinct ``shared_key``
   computed once) against Captum's 12 methods called one by one.

The floor of a method is the time its forward/backward passes alone would take: passes per image
× images ÷ the throughput (inputs/s) of ``input_gradients`` on a large batch (at least 512 inputs,
a whole number of chunks) at the same chunk size.
"% of floor" is floor time ÷ measured time (100 % = no overhead beyond the passes).

Each measured callable runs once to warm up, then ``repeats`` rounds in which the callables of a
comparison alternate (a change in machine load hits both sides alike); the best round counts.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.report import bench_parser, bench_run, header
from roar.attribution import Context, create
from roar.attribution.engine import DEFAULT_MAX_BATCH, input_gradients
from roar.models.base import Classifier
from roar.models.resnet8 import ResNet8

try:  # the per-device default chunk and the extraction stage's model preparation, where roar has them
    from roar.attribution.engine import max_batch_for
except ImportError:
    max_batch_for = None
try:
    from roar.attribution.engine import prepare_model
except ImportError:
    prepare_model = None

SECTION = "## Attribution engine"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SMALL, SEED = (16, 32, 64), (64, 128, 256)
GRID = [
    "gradient",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "ig_smoothgrad",
    "ig_smoothgrad_sq",
    "ig_vargrad",
    "guided_backprop",
    "gb_smoothgrad",
    "gb_smoothgrad_sq",
    "gb_vargrad",
]
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
SIGMA = 0.15

# Targets: IG-50 speed-up over Captum, IG-50 share of the floor, grid time relative to Captum.
IG_SPEEDUP, IG_FLOOR, GRID_RATIO = 1.2, 0.90, 0.40


@dataclass(frozen=True)
class Settings:
    images: int  # batch of the IG-50 and SmoothGrad-25 measurements
    grid_images: int
    grid_steps: int
    grid_samples: int
    repeats: int
    grid_repeats: int
    widths: tuple[tuple[int, int, int], ...]
    ig_steps: int = 50
    sg_samples: int = 25
    max_batch: int | None = None  # None: roar's own default for the CPU

    @property
    def chunk(self) -> int:
        """Inputs per forward/backward pass, on both sides."""
        if self.max_batch:
            return self.max_batch
        if max_batch_for is not None:
            return max_batch_for(torch.device("cpu"))
        return DEFAULT_MAX_BATCH

    @property
    def roar_params(self) -> dict:
        """``max_batch`` for roar's methods only when set explicitly (else roar picks it)."""
        return {"max_batch": self.max_batch} if self.max_batch else {}

    @property
    def floor_inputs(self) -> int:
        return self.chunk * -(-FLOOR_INPUTS // self.chunk)


PRESETS = {
    "quick": Settings(8, 4, 8, 4, repeats=1, grid_repeats=1, widths=(SMALL,)),
    "default": Settings(32, 16, 16, 8, repeats=5, grid_repeats=3, widths=(SMALL,)),
    "full": Settings(32, 16, 16, 8, repeats=3, grid_repeats=2, widths=(SMALL, SEED)),
}
FLOOR_INPUTS = 512


def best_of(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, tuple[float, object]]:
    """Best wall time of each callable (and what it returned in that round), callables interleaved."""
    if warmup:
        for fn in fns.values():
            fn()
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, out)
    return best


def make_model(widths: tuple[int, int, int]) -> tuple[Classifier, torch.nn.Module]:
    """(the user's model, channels_last; the same model as roar's extraction prepares it)."""
    torch.manual_seed(0)
    for_captum = Classifier(ResNet8(10, 3, widths), MEAN, STD).eval().to(memory_format=torch.channels_last)
    for_roar = prepare_model(for_captum, torch.device("cpu")) if prepare_model is not None else for_captum
    return for_captum, for_roar


def batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def floor_pass(model, s: Settings) -> Callable[[], None]:
    """``input_gradients`` on ``floor_inputs`` inputs in chunks of ``chunk``: the floor's unit of work."""
    x, t = batch(s.floor_inputs, seed=2)
    return lambda: input_gradients(model, x, t, max_batch=s.chunk)


# ---------------------------------------------------------------------------------------------- grid


def roar_grid(model, x, t, s: Settings) -> Callable[[], dict[str, float]]:
    """The 12 methods computed together: each distinct ``shared_key`` once, the others directly."""
    methods = {}
    for name in GRID:
        params: dict = dict(s.roar_params)
        if name.startswith("ig_") or name == "integrated_gradients":
            params["steps"] = s.grid_steps
        if name not in ("gradient", "integrated_gradients", "guided_backprop"):
            params["samples"] = s.grid_samples
        methods[name] = create(name, **params)

    def run() -> dict[str, float]:
        shared: dict = {}
        parts: dict[str, float] = {}
        for name, method in methods.items():
            key = method.shared_key()
            generator = torch.Generator().manual_seed(zlib.crc32(repr(key if key is not None else name).encode()))
            t0 = time.perf_counter()
            if key is None:
                method(model, x, t, generator=generator)
            else:
                if key not in shared:
                    shared[key] = method.compute_shared(model, x, t, generator=generator, context=Context())
                method.from_shared(shared[key], x).float()
            parts[name] = time.perf_counter() - t0
        return parts

    run.passes = sum(  # type: ignore[attr-defined]
        m.passes for i, (n, m) in enumerate(methods.items()) if _first_of_key(methods, n, i)
    )
    return run


def _first_of_key(methods: dict, name: str, index: int) -> bool:
    key = methods[name].shared_key()
    return key is None or all(m.shared_key() != key for m in list(methods.values())[:index])


def captum_grid(model, x, t, s: Settings) -> Callable[[], dict[str, float]]:
    """Captum's 12 methods one by one, with the same steps, samples, σ and chunk sizes as roar."""
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    b = len(x)
    bases = {
        "gradient": (Saliency(model), {"abs": False}, 1),
        "integrated_gradients": (
            IntegratedGradients(model),
            {"baselines": 0.0, "n_steps": s.grid_steps, "method": "gausslegendre", "internal_batch_size": s.chunk},
            s.grid_steps,
        ),
        "guided_backprop": (GuidedBackprop(model), {}, 1),
    }

    def run() -> dict[str, float]:
        parts: dict[str, float] = {}
        for base, (algo, kwargs, steps) in bases.items():
            t0 = time.perf_counter()
            algo.attribute(x, target=t, **kwargs)
            parts[base] = time.perf_counter() - t0
            copies = max(1, s.chunk // (b * steps))  # roar's copies per pass
            prefix = {"gradient": "", "integrated_gradients": "ig_", "guided_backprop": "gb_"}[base]
            for nt_type in NT_TYPES:
                t0 = time.perf_counter()
                NoiseTunnel(algo).attribute(
                    x,
                    nt_type=nt_type,
                    nt_samples=s.grid_samples,
                    nt_samples_batch_size=copies,
                    stdevs=SIGMA,
                    target=t,
                    **kwargs,
                )
                parts[prefix + nt_type] = time.perf_counter() - t0
        return parts

    # Each base alone, then each of the three tunnels over it with its own noisy passes.
    run.passes = (s.grid_steps + 2) * (1 + 3 * s.grid_samples)  # type: ignore[attr-defined]
    return run


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    model: str
    name: str
    unit: str  # "img/s" or "s"
    roar: float
    captum: float
    floor: float  # same unit
    target: str = ""
    met: str = ""

    @property
    def time_ratio(self) -> float:
        """roar's time ÷ Captum's time."""
        return self.roar / self.captum if self.unit == "s" else self.captum / self.roar

    @property
    def floor_share(self) -> float:
        """floor time ÷ roar's time."""
        return self.floor / self.roar if self.unit == "s" else self.roar / self.floor


def measure(widths, s: Settings, log) -> tuple[list[Row], dict]:
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    label = "ResNet8 " + "/".join(map(str, widths))
    user_model, model = make_model(widths)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    info: dict = {"label": label, "layout": "channels_last" if channels_last else "NCHW"}
    rows: list[Row] = []

    # The floor's pass is timed in the same rounds as each comparison, so all see the same load.
    floor = floor_pass(model, s)
    info["throughput"] = {}

    x, t = batch(s.images)
    ig = create("integrated_gradients", steps=s.ig_steps, rule="gausslegendre", **s.roar_params)
    captum_ig = IntegratedGradients(user_model)
    log(f"[{label}] IG-{s.ig_steps} on {s.images} images")
    r = best_of(
        {
            "floor": floor,
            "roar": lambda: ig(model, x, t),
            "captum": lambda: captum_ig.attribute(
                x,
                baselines=0.0,
                target=t,
                n_steps=s.ig_steps,
                method="gausslegendre",
                internal_batch_size=s.chunk,
            ),
        },
        s.repeats,
    )
    throughput = info["throughput"]["IG"] = s.floor_inputs / r["floor"][0]
    ours, theirs = r["roar"][1], r["captum"][1]
    info["ig_max_diff"] = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    floor_ips = throughput / ig.passes
    speedup = r["captum"][0] / r["roar"][0]
    share = (s.images / r["roar"][0]) / floor_ips
    rows.append(
        Row(
            label,
            f"IG-{s.ig_steps} ({s.images} images)",
            "img/s",
            s.images / r["roar"][0],
            s.images / r["captum"][0],
            floor_ips,
            f"≥ {IG_SPEEDUP}× Captum, ≥ {IG_FLOOR:.0%} of floor",
            _yes(speedup >= IG_SPEEDUP) + ", " + _yes(share >= IG_FLOOR),
        )
    )
    info["ig_targets"] = (speedup >= IG_SPEEDUP, share >= IG_FLOOR)
    log(f"[{label}]   roar {r['roar'][0]:.2f} s, Captum {r['captum'][0]:.2f} s, floor pass {r['floor'][0]:.2f} s")

    sg = create("smoothgrad", samples=s.sg_samples, sigma=SIGMA, **s.roar_params)
    copies = max(1, s.chunk // s.images)
    tunnel = NoiseTunnel(Saliency(user_model))
    log(f"[{label}] SmoothGrad-{s.sg_samples} on {s.images} images")
    r = best_of(
        {
            "floor": floor,
            "roar": lambda: sg(model, x, t, generator=torch.Generator().manual_seed(0)),
            "captum": lambda: tunnel.attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=s.sg_samples,
                nt_samples_batch_size=copies,
                stdevs=SIGMA,
                target=t,
                abs=False,
            ),
        },
        s.repeats,
    )
    throughput = info["throughput"]["SmoothGrad"] = s.floor_inputs / r["floor"][0]
    rows.append(
        Row(
            label,
            f"SmoothGrad-{s.sg_samples} ({s.images} images)",
            "img/s",
            s.images / r["roar"][0],
            s.images / r["captum"][0],
            throughput / sg.passes,
        )
    )
    log(f"[{label}]   roar {r['roar'][0]:.2f} s, Captum {r['captum'][0]:.2f} s, floor pass {r['floor'][0]:.2f} s")

    gx, gt = batch(s.grid_images, seed=3)
    ours_grid, their_grid = roar_grid(model, gx, gt, s), captum_grid(user_model, gx, gt, s)
    wx, wt = batch(2, seed=4)
    roar_grid(model, wx, wt, s)()  # warm-up of every code path on a tiny batch
    captum_grid(user_model, wx, wt, s)()
    log(f"[{label}] 12-method grid on {s.grid_images} images")
    r = best_of({"floor": floor, "roar": ours_grid, "captum": their_grid}, s.grid_repeats, warmup=False)
    ratio = r["roar"][0] / r["captum"][0]
    throughput = info["throughput"]["grid"] = s.floor_inputs / r["floor"][0]
    rows.append(
        Row(
            label,
            f"12-method grid ({s.grid_images} images)",
            "s",
            r["roar"][0],
            r["captum"][0],
            ours_grid.passes * s.grid_images / throughput,
            f"≤ {GRID_RATIO}× Captum's time",
            _yes(ratio <= GRID_RATIO),
        )
    )
    info["grid_target"] = ratio <= GRID_RATIO
    info["grid_parts"] = (r["roar"][1], r["captum"][1])
    info["grid_passes"] = (ours_grid.passes, their_grid.passes)
    log(f"[{label}]   roar {r['roar'][0]:.2f} s, Captum {r['captum'][0]:.2f} s, floor pass {r['floor'][0]:.2f} s")
    return rows, info


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if unit == "img/s" else f"{value:.2f} s"


def table(rows: list[Row]) -> str:
    lines = [
        "| Model | Measurement | roar | Captum | roar ÷ Captum time | Floor | roar % of floor | Target | Met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.name} | {_fmt(r.roar, r.unit)} | {_fmt(r.captum, r.unit)} | {r.time_ratio:.2f} "
            f"({1 / r.time_ratio:.2f}× speed) | {_fmt(r.floor, r.unit)} | {r.floor_share:.0%} | "
            f"{r.target or '—'} | {r.met or '—'} |"
        )
    return "\n".join(lines)


def breakdown(info: dict) -> str:
    ours, theirs = info["grid_parts"]
    lines = [
        f"{info['label']}, seconds per method in the best round (roar: a method sharing passes with an earlier one "
        "costs only its final statistic):",
        "",
        "| Method | roar | Captum |",
        "|---|---:|---:|",
    ]
    for name in GRID:
        lines.append(f"| {name} | {ours[name]:.3f} | {theirs[name]:.3f} |")
    return "\n".join(lines)


def targets(infos: list[dict], rows: list[Row]) -> str:
    lines = []
    for info in infos:
        ig = next(r for r in rows if r.model == info["label"] and r.name.startswith("IG"))
        grid = next(r for r in rows if r.model == info["label"] and r.name.startswith("12"))
        speed_ok, floor_ok = info["ig_targets"]
        lines += [
            f"- {info['label']}: IG-50 speed ≥ {IG_SPEEDUP}× Captum: {'met' if speed_ok else 'not met'} "
            f"({1 / ig.time_ratio:.2f}×).",
            f"- {info['label']}: IG-50 ≥ {IG_FLOOR:.0%} of floor speed: {'met' if floor_ok else 'not met'} "
            f"({ig.floor_share:.0%}).",
            f"- {info['label']}: 12-method grid ≤ {GRID_RATIO}× Captum's time: "
            f"{'met' if info['grid_target'] else 'not met'} ({grid.time_ratio:.2f}×; pass counts "
            f"{info['grid_passes'][0]} vs {info['grid_passes'][1]} per image, "
            f"{info['grid_passes'][0] / info['grid_passes'][1]:.2f}×).",
        ]
    return "\n".join(lines)


def settings_text(s: Settings, layout: str) -> str:
    chosen = "set by `--max-batch`" if s.max_batch else "roar's default for the CPU"
    return (
        f"ResNet8 in eval mode with random weights, channels_last; Captum runs it as it is, roar as its extraction "
        f"prepares it (BatchNorm folded into the convolutions; {layout}); random 32×32 images in [0, 1], "
        "random targets; "
        f"chunk {s.chunk} inputs per forward/backward pass on both sides ({chosen}; Captum's "
        f"`internal_batch_size`, and copies × images for noise tunnels); IG: black baseline, Gauss–Legendre; "
        f"noise σ = {SIGMA} (roar: × each image's value range, here ≈ 1; Captum: `stdevs={SIGMA}`); "
        f"grid: IG {s.grid_steps} steps, {s.grid_samples} noise samples on both sides. Best of {s.repeats} "
        f"rounds ({s.grid_repeats} for the grid) after a warm-up, the sides alternating within each round."
    )


def render(command: str, rows, infos, s: Settings, load_start, load_end, layout: str) -> str:
    diffs = ", ".join(f"{i['label']}: {i['ig_max_diff']:.1e}" for i in infos)
    throughputs = "; ".join(
        i["label"] + ": " + ", ".join(f"{v:.0f} inputs/s in the {k} rounds" for k, v in i["throughput"].items())
        for i in infos
    )
    import captum

    parts = [
        *header(SECTION, command, load_start, load_end, f"captum {captum.__version__}"),
        f"- Settings: {settings_text(s, layout)}",
        f"- Check: max |roar IG − Captum IG| ÷ max |Captum IG| = {diffs}.",
        "",
        table(rows),
        "",
        "Floor: passes per image × images ÷ the throughput of one `input_gradients` call on "
        f"{s.floor_inputs} inputs in chunks of {s.chunk}, timed in the same rounds as each comparison ({throughputs}); "
        "roar % of floor = floor time ÷ roar's time.",
        "",
        "Targets:",
        "",
        targets(infos, rows),
        "",
        *[breakdown(i) + "\n" for i in infos],
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("benchmarks.attribution", __doc__, "smoke test: small batches, one round (≈ 30 s)")
    parser.add_argument("--full", action="store_true", help="also the seed widths 64/128/256 (slow on a CPU)")
    parser.add_argument("--max-batch", type=int, metavar="N", help="inputs per pass on both sides (default: roar's)")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    s = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    if args.max_batch:
        s = dataclasses.replace(s, max_batch=args.max_batch)
    warnings.filterwarnings("ignore", module="captum")
    warnings.filterwarnings("ignore", message=".*requires_grad.*")

    def measure_all(log) -> tuple[list, list]:
        rows, infos = [], []
        for widths in s.widths:
            r, info = measure(widths, s, log)
            rows += r
            infos.append(info)
        return rows, infos

    def render_all(command: str, result: tuple[list, list], load_start: float, load_end: float) -> str:
        rows, infos = result
        return render(command, rows, infos, s, load_start, load_end, infos[0]["layout"])

    return bench_run("benchmarks.attribution", argv, args.write, measure_all, render_all)


if __name__ == "__main__":
    raise SystemExit(main())
