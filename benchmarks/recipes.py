"""Time to accuracy of the training recipes: the fast recipe against the demo's previous recipe, lever
by lever, and the projected cost of the ROAR paper's CIFAR-10 protocol on one GPU.

    python -m benchmarks.recipes [--quick] [--seed-widths] [--write docs/benchmarks.md]

What is measured is the quantity a retraining sweep pays for: the wall time of training (evaluation
excluded) until the model reaches a target test accuracy. A recipe's schedule depends on its
length (warm-up and decay are fractions of the run), so "epochs to a target" is the smallest budget
E on a ladder (1, 2, 3, 4, 6, 8, 10 epochs) whose *complete* run, trained from scratch with that
schedule, ends at or above the target; its seconds are that run's training seconds. All runs use
the demo config's data and model (ResNet8 16/32/64 on the built-in shapes data), seed 0, on the
CPU, in one process, one after the other.

1. **Comparison.** The demo's previous recipe (Adam 0.004, batch 128, random crop and flip,
   one-cycle schedule over 10 epochs: what trained the base model and every retrain before) and the
   ``fast`` recipe of ``roar.training.recipes``; the base accuracy is the previous recipe's after its
   full 10 epochs, and the targets are 90% and 95% of it, plus the absolute 90% of the demo target.
2. **Ablation.** The levers added one at a time from the previous recipe to the fast one (the last
   cumulative row is checked to equal ``RECIPES["fast"]``), then each lever that was tried and not
   kept, added alone to the fast recipe: epochs and seconds to 90% test accuracy.
3. **Projection.** The paper's CIFAR-10 protocol (14 methods x 5 thresholds x 3 seeds x ROAR and
   KAR, plus 3 unmodified runs) with the seed's ResNet8 (64/128/256) at the fast recipe's epochs: its
   training FLOPs counted by ``torch.utils.flop_counter`` on the real model, the images/s of one
   training epoch measured here (on CUDA when present), and the wall time on one GPU from the
   throughput the CIFAR-10 speed record reaches on an A100 (airbench94: 0.36 PFLOPs in 3.83 s), with
   the arithmetic shown.

``--seed-widths`` runs the comparison (1.) on the seed's ResNet8 (64/128/256) instead, on the
demo's 4000 + 1000 images (CIFAR-10's geometry), in a section of its own.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from benchmarks.report import bench_parser, bench_run, header
from roar.config import load_config
from roar.core.device import resolve_device
from roar.data import build_dataset
from roar.models import build_model
from roar.training.config import TrainingConfig
from roar.training.recipes import RECIPES, merge
from roar.training.sources import InMemorySource
from roar.training.trainer import fit

SECTION = "## Training recipes: time to accuracy"

PREVIOUS = {
    "epochs": 10,
    "batch_size": 128,
    "optimizer": {"name": "adam", "lr": 0.004, "weight_decay": 1e-4},
    "schedule": {"name": "onecycle", "warmup_fraction": 0.2},
    "augment": {"crop_padding": 4, "flip": True},
}
"""The demo's recipe before the fast one (configs/demo.yaml's training section until then)."""

KEPT = [
    ("whitening-initialised first convolution", {"whiten_init": True}),
    ("label smoothing 0.2", {"label_smoothing": 0.2}),
    ("3x learning rate (Adam 0.012)", {"optimizer": {"lr": 0.012}}),
    ("batch 48 (from 128)", {"batch_size": 48}),
    ("no random crop (flips only)", {"augment": {"crop_padding": 0}}),
]
"""Levers of the fast recipe, in the order they are added to the previous recipe."""

NOT_KEPT = [
    ("EMA of the weights (decay 0.99)", {"ema": 0.99}),
    ("Lookahead (every 5 steps, alpha 0.5)", {"lookahead": {"every": 5, "alpha": 0.5}}),
    ("BatchNorm momentum 0.4 (fast statistics)", {"bn_momentum": 0.4}),
    ("4x learning rate on BatchNorm weights", {"bn_lr_scale": 4.0}),
    ("alternating flips", {"augment": {"flip": "alternating"}}),
    ("Nesterov SGD 0.2 instead of Adam", {"optimizer": {"name": "sgd", "lr": 0.2, "weight_decay": 5e-4}}),
    ("flip test-time augmentation", {"tta": "flip"}),
]
"""Levers tried on top of the fast recipe and not kept (each added alone)."""

PROTOCOL = {"methods": 14, "thresholds": 5, "seeds": 3, "modes": 2, "baselines": 3}
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
AIRBENCH_FLOPS, AIRBENCH_SECONDS = 0.36e15, 3.83  # airbench94 on one A100 (docs: fast-training records)


@dataclass(frozen=True)
class Settings:
    ladder: tuple[int, ...]
    train_size: int
    test_size: int
    ablation: bool
    throughput_images: int
    widths: tuple[int, int, int] = (16, 32, 64)
    previous_ladder: tuple[int, ...] | None = None  # default: ``ladder``


PRESETS = {
    # The data the previous recipe was made for (the demo's before the fast recipe: 8000 + 2000 images),
    # on which it reached 95% in 10 epochs; on today's smaller demo data it stops at 77%.
    "default": Settings((1, 2, 3, 4, 6, 8, 10), 8000, 2000, True, 1024),
    "quick": Settings((1, 2), 256, 128, False, 64),
    # The seed's ResNet8 on the same CIFAR-like data; 16x the compute per image (about a minute per
    # epoch on 2 CPU cores), so the previous recipe runs only its full 10 epochs (the base accuracy)
    # and the fast one 2 and 3.
    "seed_widths": Settings((2, 3), 4000, 1000, False, 512, (64, 128, 256), (10,)),
}


@dataclass
class Ladder:
    """Runs of one recipe at growing budgets: (epochs, final test accuracy, training seconds)."""

    name: str
    runs: list[tuple[int, float, float]] = field(default_factory=list)

    def reach(self, target: float) -> tuple[int, float] | None:
        """(epochs, seconds) of the smallest budget whose run ends at or above ``target``."""
        return next(((e, s) for e, acc, s in self.runs if acc >= target), None)


def recipe(*overrides: dict, epochs: int) -> TrainingConfig:
    section = PREVIOUS
    for over in overrides:
        section = merge(section, over)
    return TrainingConfig.model_validate({**section, "epochs": epochs, "eval_every": 0, "num_workers": 0})


def train_once(data, cfg: TrainingConfig, device) -> tuple[float, float]:
    """Final test accuracy and training seconds of one complete run of ``cfg`` from scratch (seed 0)."""
    dataset, train, test, model_cfg = data
    torch.manual_seed(0)
    model = build_model(model_cfg, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    with tempfile.TemporaryDirectory() as out:
        summary, _ = fit(model, train, test, cfg, out, 0, device, desc="bench")
    return summary["test_accuracy"], summary["train_seconds"]


def ladder(name: str, overrides: list[dict], data, s: Settings, device, log, stop_at: float | None) -> Ladder:
    """Runs at each budget of the ladder until one ends at or above ``stop_at`` (None: every budget)."""
    result = Ladder(name)
    for epochs in s.ladder:
        acc, seconds = train_once(data, recipe(*overrides, epochs=epochs), device)
        result.runs.append((epochs, acc, seconds))
        log(f"{name}: {epochs} epochs -> {100 * acc:.1f}% in {seconds:.1f} s")
        if stop_at is not None and acc >= stop_at:
            break
    return result


def fast_overrides() -> list[dict]:
    """The kept levers, checked to rebuild the fast recipe exactly (but its epochs)."""
    overrides = [over for _, over in KEPT]
    built = recipe(*overrides, epochs=1).model_dump(exclude={"recipe", "epochs", "eval_every", "num_workers"})
    fast = TrainingConfig.model_validate({"recipe": "fast", "epochs": 1, "eval_every": 0, "num_workers": 0})
    if built != fast.model_dump(exclude={"recipe", "epochs", "eval_every", "num_workers"}):
        raise RuntimeError("the ablation's kept levers no longer rebuild RECIPES['fast']: update KEPT")
    return overrides


def throughput(model_cfg, dataset, device, images: int, batch_size: int) -> float:
    """Training images/s of one epoch (forward, backward, Adam step) on ``images`` random images."""
    from roar.core.device import autocast, memory_format

    torch.manual_seed(0)
    model = build_model(model_cfg, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    model.to(device=device, memory_format=memory_format(device)).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(images, *dataset.train.geometry, device=device).contiguous(memory_format=memory_format(device))
    y = torch.randint(0, dataset.num_classes, (images,), device=device)

    def epoch():
        for i in range(0, images, batch_size):
            with autocast(device):
                loss = F.cross_entropy(model(x[i : i + batch_size]).float(), y[i : i + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    epoch()  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        epoch()
        best = min(best, time.perf_counter() - t0)
    return images / best


def forward_flops(model_cfg, dataset) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_cfg, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *dataset.train.geometry))
    return counter.get_total_flops()


def measure(s: Settings, log) -> dict:
    device = resolve_device("auto")
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"dataset.train_size={s.train_size}",
            f"dataset.test_size={s.test_size}",
            f"model.widths=[{','.join(map(str, s.widths))}]",
        ],
    )
    dataset = build_dataset(cfg.dataset)
    data = (
        dataset,
        InMemorySource(dataset.train.images, dataset.train.labels, device),
        InMemorySource(dataset.test.images, dataset.test.labels, device),
        cfg.model,
    )
    fast = fast_overrides()
    previous = ladder("previous", [], data, replace(s, ladder=s.previous_ladder or s.ladder), device, log, None)
    base = previous.runs[-1][1]
    targets = [0.9 * base, 0.95 * base, 0.90]
    fast_ladder = ladder("fast", fast, data, s, device, log, max(targets))
    info = {
        "device": device,
        "cfg": cfg,
        "s": s,
        "base": base,
        "targets": targets,
        "previous": previous,
        "fast": fast_ladder,
        "cumulative": [],
        "alone": [],
    }
    if s.ablation:
        for i in range(1, len(KEPT)):
            name = "+ " + KEPT[i - 1][0]
            info["cumulative"].append(ladder(name, fast[:i], data, s, device, log, 0.90))
        for name, over in NOT_KEPT:
            info["alone"].append(ladder("fast + " + name, [*fast, over], data, s, device, log, 0.90))
    seed_model = cfg.model.model_copy(update={"widths": [64, 128, 256]})
    info["flops"] = forward_flops(seed_model, dataset)
    info["demo_flops"] = forward_flops(cfg.model, dataset)
    info["images_per_s"] = throughput(seed_model, dataset, device, s.throughput_images, 256)
    info["demo_images_per_s"] = throughput(cfg.model, dataset, device, s.throughput_images, 48)
    return info


# ----------------------------------------------------------------------------------------------- render


def _reach(ladder_: Ladder, target: float) -> str:
    got = ladder_.reach(target)
    if got is None:
        return f"not within {ladder_.runs[-1][0]} epochs"
    return f"{got[0]} epoch{'s' if got[0] != 1 else ''}, {got[1]:.1f} s"


def comparison(info: dict) -> str:
    t90, t95, abs90 = info["targets"]
    prev, fast = info["previous"], info["fast"]
    lines = [
        "| Target | Previous recipe | Fast recipe | Time ratio |",
        "|---|---|---|---:|",
    ]
    for label, target in (
        (f"90% of base ({100 * t90:.1f}%)", t90),
        (f"95% of base ({100 * t95:.1f}%)", t95),
        ("90% test accuracy", abs90),
    ):
        a, b = prev.reach(target), fast.reach(target)
        ratio = f"{a[1] / b[1]:.1f}× less time" if a and b else "—"
        lines.append(f"| {label} | {_reach(prev, target)} | {_reach(fast, target)} | {ratio} |")
    lines += ["", "Every run of the two ladders (budget → final test accuracy, training seconds):", ""]
    budgets = sorted({e for lad in (prev, fast) for e, _, _ in lad.runs})
    lines += ["| Recipe | " + " | ".join(f"{e} ep" for e in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for lad in (prev, fast):
        cells = {e: f"{100 * acc:.1f}% ({sec:.0f} s)" for e, acc, sec in lad.runs}
        lines.append(f"| {lad.name} | " + " | ".join(cells.get(e, "") for e in budgets) + " |")
    return "\n".join(lines)


def ablation(info: dict) -> str:
    if not info["cumulative"]:
        return "(the ablation runs only in the default preset)"
    lines = ["| Recipe | Epochs to 90% | Seconds to 90% | Accuracy of that run |", "|---|---:|---:|---:|"]

    def row(name: str, lad: Ladder) -> str:
        got = lad.reach(0.90)
        if got is None:
            best = max(acc for _, acc, _ in lad.runs)
            return f"| {name} | > {lad.runs[-1][0]} | — | best {100 * best:.1f}% |"
        acc = next(a for e, a, _ in lad.runs if e == got[0])
        return f"| {name} | {got[0]} | {got[1]:.1f} | {100 * acc:.1f}% |"

    lines.append(row("previous recipe", info["previous"]))
    for lad in info["cumulative"]:
        lines.append(row(lad.name, lad))
    lines.append(row("+ " + KEPT[-1][0] + " = **fast**", info["fast"]))
    for lad in info["alone"]:
        lines.append(row(lad.name + " (not kept)", lad))
    lines += [
        "",
        "A lever is kept when it reaches the target on a shorter budget; the ones that tie with the fast "
        "recipe at the ladder's resolution are left out (seconds of runs of equal cost differ by ±10% between "
        "runs on a shared machine, and the final accuracies by about a point between seeds).",
    ]
    return "\n".join(lines)


def projection(info: dict) -> str:
    p = PROTOCOL
    epochs = load_config("configs/cifar10_resnet8.yaml").retrain.training.epochs
    fast_epochs = RECIPES["fast"]["epochs"]
    runs = p["methods"] * p["thresholds"] * p["seeds"] * p["modes"] + p["baselines"]
    train_flops = 3 * info["flops"]  # forward + backward (about twice the forward)

    def minutes(e: int) -> float:
        return runs * (e * CIFAR_TRAIN * train_flops + CIFAR_TEST * info["flops"]) / rate / 60

    total = runs * (epochs * CIFAR_TRAIN * train_flops + CIFAR_TEST * info["flops"])
    rate = AIRBENCH_FLOPS / AIRBENCH_SECONDS
    images = runs * epochs * CIFAR_TRAIN
    here = images / info["images_per_s"]
    dev = info["device"]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this CPU"
    return "\n".join(
        [
            f"- Runs: {p['methods']} methods × {p['thresholds']} thresholds × {p['seeds']} seeds × "
            f"{p['modes']} modes + {p['baselines']} unmodified = **{runs}** retrainings.",
            f"- Per run: {epochs} epochs (`configs/cifar10_resnet8.yaml`'s `roar.training`: the fast recipe for "
            f"{epochs} epochs, about what the CIFAR-10 speed record needs for 94%) × {CIFAR_TRAIN:,} training "
            f"images, then one test pass over {CIFAR_TEST:,}.",
            f"- ResNet8 64/128/256 at 32×32: {info['flops'] / 1e9:.3f} GFLOPs per image forward "
            f"(`torch.utils.flop_counter`), × 3 for a training step = {train_flops / 1e9:.3f} GFLOPs.",
            f"- Total: {runs} × ({epochs} × {CIFAR_TRAIN:,} × {train_flops / 1e9:.3f} + {CIFAR_TEST:,} × "
            f"{info['flops'] / 1e9:.3f}) GFLOPs = **{total / 1e15:.0f} PFLOPs**.",
            f"- One GPU at the throughput the CIFAR-10 speed record sustains on an A100 "
            f"({AIRBENCH_FLOPS / 1e15:.2f} PFLOPs in {AIRBENCH_SECONDS} s = {rate / 1e12:.0f} TFLOP/s): "
            f"{total / 1e15:.0f} PFLOPs ÷ {rate / 1e12:.0f} TFLOP/s = **{minutes(epochs):.0f} min** "
            f"({'within' if minutes(epochs) <= 60 else 'over'} the 1-hour target); at a third of that "
            f"efficiency, {3 * minutes(epochs):.0f} min; with the {fast_epochs} epochs the built-in data needs, "
            f"{minutes(fast_epochs):.0f} min. The seed's recipe (50 epochs per run) would take "
            f"{minutes(50):.0f} min at the same throughput.",
            f"- Measured on {where}: one training epoch of ResNet8 64/128/256 at batch 256 runs at "
            f"{info['images_per_s']:.0f} images/s, so the same {images / 1e6:.1f} M training images would take "
            f"{here / 3600:.0f} h here (the demo's 16/32/64 at batch 48: {info['demo_images_per_s']:.0f} images/s, "
            f"{info['demo_flops'] / 1e9:.3f} GFLOPs forward). With a GPU at hand, this line measures it there.",
        ]
    )


def render(command: str, info: dict, load_start: float, load_end: float) -> str:
    s, cfg = info["s"], info["cfg"]
    if s.widths != PRESETS["default"].widths:
        return render_widths(command, info, load_start, load_end)
    widths = "/".join(map(str, cfg.model.widths))
    parts = [
        *header(SECTION, command, load_start, load_end),
        f"- Settings: {cfg.model.name} {widths} on the built-in shapes data ({s.train_size} training, "
        f"{s.test_size} test images), seed 0, device {info['device']}; budgets {', '.join(map(str, s.ladder))} "
        "epochs, each a complete run from scratch with its own schedule; seconds are training time without "
        "evaluation. The base accuracy is the previous recipe's after 10 epochs: "
        f"**{100 * info['base']:.1f}%**.",
        "",
        "### Previous recipe against the fast recipe",
        "",
        comparison(info),
        "",
        "### Lever by lever (to 90% test accuracy)",
        "",
        ablation(info),
        "",
        "### The paper's CIFAR-10 protocol on one GPU (projected)",
        "",
        projection(info),
    ]
    return "\n".join(parts).rstrip() + "\n"


def render_widths(command: str, info: dict, load_start: float, load_end: float) -> str:
    """The section of another model (the seed's widths): the comparison only."""
    s, cfg = info["s"], info["cfg"]
    widths = "/".join(map(str, cfg.model.widths))
    parts = [
        *header(f"{SECTION}, ResNet8 {widths}", command, load_start, load_end),
        f"- Settings: the seed's {cfg.model.name} {widths} (CIFAR-10's ResNet8) on the built-in shapes data "
        f"(32×32×3, 10 classes: CIFAR-10's geometry; {s.train_size} training, {s.test_size} test images), seed 0, "
        f"device {info['device']}; the previous recipe at {', '.join(map(str, s.previous_ladder))} epochs, the "
        f"fast one at {', '.join(map(str, s.ladder))}, each a complete run from scratch; seconds are training time "
        f"without evaluation. Base accuracy (the previous recipe after 10 epochs): **{100 * info['base']:.1f}%**.",
        "",
        comparison(info),
        "",
        f"The previous recipe ran only budgets of {', '.join(map(str, s.previous_ladder))} epochs: its times to a "
        "target are upper bounds (on ResNet8 16/32/64 it needs 8 of its 10 epochs for 90%, in the section above).",
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    quick = f"smoke test: {PRESETS['quick'].train_size} images, budgets of 1 and 2 epochs, no ablation"
    parser = bench_parser("benchmarks.recipes", __doc__, quick)
    parser.add_argument(
        "--seed-widths", action="store_true", help="compare the recipes on the seed's ResNet8 (64/128/256) instead"
    )
    args = parser.parse_args(argv)
    s = PRESETS["quick" if args.quick else "seed_widths" if args.seed_widths else "default"]
    return bench_run("benchmarks.recipes", argv, args.write, lambda log: measure(s, log), render)


if __name__ == "__main__":
    raise SystemExit(main())
