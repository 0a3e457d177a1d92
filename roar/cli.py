"""The ``roar`` command: one subcommand per pipeline stage, each driven by a YAML config.

Every subcommand takes ``--config PATH`` (default ``configs/demo.yaml``) and repeated
``--set dotted.key=value`` overrides, prints one summary line when it is done, and on bad input
prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from roar.core.errors import RoarError

DEFAULT_CONFIG = "configs/demo.yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.epochs=3 (repeatable)",
    )


def _load(args):
    from roar.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> str:
    from roar.stages import train
    from roar.training import distributed

    cfg = _load(args)
    if args.nproc is not None:  # start N ranks of this same command through torchrun
        rank_args = ["train", "--config", args.config, *(f"--set={o}" for o in args.overrides)]
        rank_args += ["--restart"] if args.restart else []
        status = distributed.launch(
            rank_args,
            args.nproc,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            batch_size=cfg.training.batch_size,
        )
        if status:
            raise RoarError(
                f"torchrun exited with status {status}: a rank failed (its error is above); rerun to resume"
            )
        return ""  # rank 0 has printed the summary
    try:
        result = train.run(cfg, restart=args.restart)
    finally:
        distributed.shutdown()
    return result.summary() if distributed.is_main() else ""


def cmd_extract(args) -> str:
    from roar.stages import extract
    from roar.training.distributed import torchrun_shard

    return extract.run(_load(args), args.shard or torchrun_shard()).summary()


def cmd_merge(args) -> str:
    from roar.stages import extract
    from roar.stages.vog import gradients

    if args.shards < 2:
        raise RoarError(f"--shards {args.shards}: merging needs at least 2 shards")
    cfg = _load(args)
    merged = (gradients if args.vog else extract).merge_shards(cfg, args.shards)
    return f"merged {args.shards} shards into {', '.join(str(p) for p in merged)}"


def cmd_patterns(args) -> str:
    from roar.stages import patterns

    return patterns.run(_load(args)).summary()


def cmd_retrain(args) -> str:
    from roar.stages.retrain import sweep

    modes = ["roar", "kar"] if args.mode == "both" else [args.mode]
    return sweep.run(_load(args), modes, args.shard).summary()


def cmd_curves(args) -> str:
    from roar.stages import curves

    return curves.run(_load(args)).summary()


def cmd_vog(args) -> str:
    from roar.stages.vog import stage
    from roar.training.distributed import torchrun_shard

    return stage.run(_load(args), args.shard or torchrun_shard()).summary()


def cmd_metrics(args) -> str:
    from roar.stages import metrics

    return metrics.run(_load(args)).summary()


def cmd_insecurity(args) -> str:
    from roar.stages.insecurity import stage

    return stage.run(_load(args)).summary()


def cmd_report(args) -> str:
    from roar.stages.report import stage

    return stage.run(_load(args), args.config, args.markdown_to).summary()


def cmd_vog_toy(args) -> str:
    from roar.core.schema import SEED_LIMIT, SEED_RANGE
    from roar.stages import vog_toy

    if not 0 <= args.seed < SEED_LIMIT:
        raise RoarError(f"--seed {args.seed}: a seed must be {SEED_RANGE}")

    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    return vog_toy.run_toy(
        split=args.split, stage=args.stage, vog_cal=args.vog_cal, seed=args.seed, out=args.out, **epochs
    ).summary()


def cmd_inspect(args) -> str:
    from roar.store import describe

    for path in args.files:
        print(describe(path))
    return ""


def cmd_config(args) -> str:
    from roar.config import dump_config

    cfg = _load(args)
    sys.stdout.write(dump_config(cfg))
    return f"config {args.config} is valid"


def _registries() -> dict:
    from roar.attribution import METHODS
    from roar.data import DATASETS
    from roar.metrics import METRICS
    from roar.models import MODELS
    from roar.perturb import FILLS

    return {"datasets": DATASETS, "models": MODELS, "methods": METHODS, "fills": FILLS, "metrics": METRICS}


def cmd_list(args) -> str:
    registries = _registries()
    for kind in [args.kind] if args.kind else registries:
        print(f"{kind}: {', '.join(registries[kind].names())}")
    return ""


def build_parser() -> argparse.ArgumentParser:
    from roar import __version__
    from roar.stages import vog_toy as toy

    parser = argparse.ArgumentParser(
        prog="roar", description="Which attribution method to trust, and which training examples are hard."
    )
    parser.add_argument("--version", action="version", version=f"roar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the base classifier (task train-cls)")
    _config_args(p)
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint instead of resuming from it")
    ddp = p.add_argument_group("data-parallel training through torchrun (training.batch_size is the global batch)")
    ddp.add_argument(
        "--nproc", type=int, metavar="N", help="processes per machine: one per GPU, or CPU processes (gloo)"
    )
    ddp.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines taking part (default: 1)")
    ddp.add_argument("--node-rank", type=int, default=0, metavar="K", help="this machine's index, 0 to M-1")
    ddp.add_argument("--master-addr", metavar="HOST", help="address of machine 0 (several machines)")
    ddp.add_argument("--master-port", type=int, metavar="PORT", help="a free port on machine 0 (default: 29500)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("extract", help="attribution maps of every configured method (task extract-attribution-maps)")
    _config_args(p)
    p.add_argument(
        "--shard", metavar="I/N", help="compute rows of shard I of N (0-based) into a shard store; the last one merges"
    )
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "merge", help="stitch the shard stores of roar extract (or vog) --shard into one store per split"
    )
    _config_args(p)
    p.add_argument("--shards", type=int, required=True, metavar="N", help="how many shards the extraction used")
    p.add_argument("--vog", action="store_true", help="the VoG gradient stores of roar vog --shard instead")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "patterns",
        help="signal patterns of PatternNet, PatternAttribution and PGIG from the training images (task patterns)",
    )
    _config_args(p)
    p.set_defaults(func=cmd_patterns)

    p = sub.add_parser(
        "retrain",
        aliases=["evaluate"],
        help="ROAR/KAR: retrain on images with the top pixels removed or kept (task evaluate-roar, evaluate-kar)",
    )
    _config_args(p)
    p.add_argument(
        "--mode", choices=["roar", "kar", "both"], default="both", help="remove (roar) or keep (kar) the top pixels"
    )
    p.add_argument("--shard", metavar="I/N", help="run every N-th run starting at I (0-based), to share a sweep")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "curves",
        aliases=["lerf"],
        help="MoRF, LeRF and random-order curves, pixels or patches, any fill, without retraining (task curves)",
    )
    _config_args(p)
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser("vog", help="VoG example difficulty and peer scores over the training snapshots (task vog)")
    _config_args(p)
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="compute the gradients of rows of shard I of N (0-based); the last one merges; then 'roar vog' scores",
    )
    p.set_defaults(func=cmd_vog)

    p = sub.add_parser(
        "metrics",
        help="localisation, randomisation, complexity and robustness metrics, and which to trust (task metrics)",
    )
    _config_args(p)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "insecurity", help="deliberative insecurity maps: where the model is torn between two classes (task insecurity)"
    )
    _config_args(p)
    p.set_defaults(func=cmd_insecurity)

    p = sub.add_parser(
        "report", help="one page of the run: self-contained HTML and markdown in runs/<name>/report/ (task report)"
    )
    _config_args(p)
    p.add_argument(
        "--markdown-to",
        metavar="PATH.md",
        help="also write the markdown here, its figures in a folder beside it named after it (docs/results.md)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("vog-toy", help="VoG on 2-D blobs against the distance to the decision boundary (task vog-toy)")
    p.add_argument("--split", choices=toy.SPLITS, default="train", help="the points scored (default: train)")
    p.add_argument(
        "--stage",
        choices=toy.STAGES,
        default="complete",
        help="the snapshots used: a third of the epochs, or all (default: complete)",
    )
    p.add_argument(
        "--vog-cal",
        choices=toy.CALIBRATIONS,
        default="raw",
        help="raw VoG, class-normalised, or its absolute value (default: raw)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the blobs, the split and the weights (default: 0)")
    p.add_argument("--epochs", type=int, help="full-batch SGD epochs, one snapshot after each (default: 100)")
    p.add_argument("--out", default="runs/vog_toy", help="output folder (default: runs/vog_toy)")
    p.set_defaults(func=cmd_vog_toy)

    p = sub.add_parser("inspect", help="what an attribution store holds: methods, sizes, provenance, completeness")
    p.add_argument("files", nargs="+", metavar="FILE.h5")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("config", help="validate a config and print it with every default resolved")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("list", help="list the registered datasets, models, methods, fills and metrics")
    p.add_argument("kind", nargs="?", choices=list(_registries()))
    p.set_defaults(func=cmd_list)
    return parser


def _shard_value_joined(argv: list[str]) -> list[str]:
    """``argv`` with ``--shard -1/2`` spelt ``--shard=-1/2``: argparse takes a value that starts with a dash
    and a digit for an option of its own, so that roar's check, which says what a shard must be, never
    sees it. Other values are left to argparse (a missing one is its error), and so is all after ``--``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if token == "--":
            return out + argv[i:]
        if token == "--shard" and value.startswith("-") and value[1:2].isdigit():
            out.append(f"--shard={value}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_shard_value_joined(argv))
    try:
        summary = args.func(args)
    except RoarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    if summary:
        print(summary)
    return 0
