"""Floor 7: the command line. Parses arguments and calls the floors below; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_settings(args) -> int:
    from . import settings

    for name, s in settings.available().items():
        p = s.protocols["default"]
        paper = f"  paper LDS {s.paper_lds:.2f}" if s.paper_lds is not None else ""
        print(f"{name:22s} {s.description}{paper}")
        print(f"{'':22s} recipe {s.recipe_hash()}: {s.recipe.to_dict()}")
        print(f"{'':22s} default protocol: M={p.subsets} α={p.alpha} R={p.seeds} Q={p.queries} "
              f"V={p.validation_queries} K={p.full_models} seeds {p.seed_policy}")
    return 0


def _cmd_data(args) -> int:
    from . import settings

    for name in args.setting:
        d = settings.get(name).data()
        print(f"{name}: train {tuple(d.train_x.shape)}, test {tuple(d.test_x.shape)}, {d.num_classes} classes (verified)")
    return 0


def _cmd_gt(args) -> int:
    from . import groundtruth, settings
    from .executors import LocalExecutor

    if args.verify:
        summary = groundtruth.verify(args.setting, args.version)
        print(json.dumps(summary, indent=2))
        if not summary["complete"]:
            print(f"note: {summary['artifact']} is incomplete ({summary['units']} units); "
                  f"finish it with `tdabench gt {args.setting}`", file=sys.stderr)
            return 3 if args.require_complete else 0
        return 0
    setting = settings.get(args.setting)
    protocol = groundtruth.protocol_with(
        setting.protocols[args.protocol], alpha=args.alpha, subsets=args.subsets, seeds=args.seeds,
        queries=args.queries, validation_queries=args.validation_queries, full_models=args.full_models,
        seed_policy=args.seed_policy, base_seed=args.base_seed)
    executor = None
    if args.workers is not None:
        executor = LocalExecutor(args.workers, args.threads or 0)
    groundtruth.build(args.setting, protocol, executor=executor, device=args.device, trainer=args.trainer,
                      models_per_job=args.models_per_job, max_units=args.max_units, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdabench", description="Benchmark of influence-function solvers for "
                                "training-data attribution (LDS, mislabel detection, IHVP error, cost).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("settings", help="list the settings with their recipes and default protocols")
    s.set_defaults(func=_cmd_settings)

    s = sub.add_parser("data", help="fetch and verify a setting's data files")
    s.add_argument("setting", nargs="+")
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser("gt", help="build, resume, extend or verify a ground-truth artifact")
    s.add_argument("setting")
    s.add_argument("--verify", action="store_true", help="verify the newest (or --version) artifact and print a summary")
    s.add_argument("--require-complete", action="store_true", help="with --verify: exit 3 if the artifact is incomplete")
    s.add_argument("--version", help="artifact version to verify, e.g. v1 (default: the newest)")
    s.add_argument("--protocol", default="default", help="named protocol of the setting (default: default)")
    s.add_argument("--alpha", type=float)
    s.add_argument("--subsets", type=int, help="M, the number of random subsets")
    s.add_argument("--seeds", type=int, help="R, seed replicas per subset")
    s.add_argument("--queries", type=int, help="Q, reported test queries")
    s.add_argument("--validation-queries", type=int, help="V, disjoint test queries for tuning")
    s.add_argument("--full-models", type=int, help="K, full-data models to explain")
    s.add_argument("--seed-policy", choices=["shared", "varied"])
    s.add_argument("--base-seed", type=int)
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--trainer", choices=["auto", "loop", "vmap"], default="auto")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core on CPU, 1 on GPU)")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    s.add_argument("--models-per-job", type=int, default=100, help="models trained together by vmap")
    s.add_argument("--max-units", type=int, help="stop after this many units (the artifact stays incomplete)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_gt)
    return p


def main(argv=None) -> int:
    from .artifacts import ArtifactError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ArtifactError, DataError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tdabench: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
