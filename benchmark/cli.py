"""Floor 7: the command line. Parses arguments and calls the floors below; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def _cmd_settings(args) -> int:
    from . import settings

    from .data import DataError
    from .deps import MissingDependency

    for name, s in settings.available().items():
        p = s.protocols["default"]
        paper = f"  paper LDS {s.paper_lds:.2f}" if s.paper_lds is not None else ""
        print(f"{name:22s} {s.description}{paper}")
        try:  # the hash builds the model: settings needing timm or pretrained weights may not build here
            recipe = s.recipe_hash()
        except (MissingDependency, DataError) as exc:
            why = str(exc).splitlines()[0].rstrip(".")
            recipe = f"unavailable here (requires {', '.join(s.requires) or 'nothing extra'}): {why}"
        print(f"{'':22s} recipe {recipe}: {s.recipe.to_dict()}")
        print(f"{'':22s} default protocol: M={p.subsets} α={p.alpha} R={p.seeds} Q={p.queries} "
              f"V={p.validation_queries} K={p.full_models} seeds {p.seed_policy}")
    return 0


def _cmd_data(args) -> int:
    from . import settings

    for name in args.setting:
        s = settings.get(name)
        d = s.data()
        print(f"{name}: train {tuple(d.train_x.shape)}, test {tuple(d.test_x.shape)}, {d.num_classes} classes (verified)")
        if s.requires:  # settings on timm models may start from pretrained weights: fetch those too
            print(f"{name}: model {s.model_spec()['parameters']:,} parameters (builds here)")
    return 0


def _cmd_gt(args) -> int:
    from . import groundtruth, settings
    from .executors import LocalExecutor

    study = args.study or settings.DERIVED_SEP in args.setting
    gt_root = groundtruth.STUDY_ROOT if study else groundtruth.GT_ROOT
    if args.verify:
        summary = groundtruth.verify(args.setting, args.version, gt_root)
        print(json.dumps(summary, indent=2))
        if not summary["complete"]:
            man = {"setting": args.setting, "protocol": summary["protocol"]}
            print(f"note: {summary['artifact']} is incomplete ({summary['units']} units); finish it with "
                  f"`{groundtruth.build_command(man, Path(summary['artifact']))}`", file=sys.stderr)
            return 3 if args.require_complete else 0
        return 0
    setting = settings.get(args.setting)
    protocol = groundtruth.protocol_with(
        setting.protocols[args.protocol], alpha=args.alpha, subsets=args.subsets, seeds=args.seeds,
        queries=args.queries, validation_queries=args.validation_queries, full_models=args.full_models,
        seed_policy=args.seed_policy, base_seed=args.base_seed)
    executor = None
    if args.executor == "ray":
        from .executors import RayExecutor

        if args.workers is not None:
            raise ValueError("--workers is for the local executor; Ray runs as many tasks as the cluster has room for")
        executor = RayExecutor(address=args.address, num_gpus_per_task=args.gpus_per_task,
                               num_cpus_per_task=args.cpus_per_task, max_retries=args.max_retries,
                               threads_per_worker=args.threads)
    elif args.address is not None:
        raise ValueError("--address needs --executor ray")
    elif args.workers is not None:
        executor = LocalExecutor(args.workers, args.threads or 0)
    groundtruth.build(args.setting, protocol, gt_root=gt_root, executor=executor, device=args.device,
                      trainer=args.trainer, models_per_job=args.models_per_job, max_units=args.max_units,
                      progress=not args.quiet)
    return 0


def _cmd_zoo(args) -> int:
    from . import zoo
    from .executors import LocalExecutor

    executor = LocalExecutor(args.workers, args.threads or 0) if args.workers is not None else None
    zoo.build(args.setting, zoo.ZooSpec(models=args.models, base_seed=args.base_seed), executor=executor,
              device=args.device, progress=not args.quiet)
    return 0


def _params(items) -> dict:
    from .runner import parse_param

    return dict(parse_param(t) for t in items or [])


def _cmd_run(args) -> int:
    from . import runner

    rec = runner.run(args.setting, args.solver, _params(args.param), tasks=args.task, search=not args.no_search,
                     search_queries=args.search_queries, ensemble=args.ensemble, measurement=args.measurement,
                     version=args.version, device=args.device)
    lds, mis = rec.get("lds"), rec.get("mislabel")
    if lds:
        used = lds["ground_truth"]
        print(f"{args.setting} / {args.solver}: LDS {lds['mean']:.4f} ± {lds['se']:.4f} "
              f"[{lds['ci_low']:.4f}, {lds['ci_high']:.4f}] on {lds['queries']} queries, params {lds.get('params')}; "
              f"ground truth {used['version']} " + ("complete" if used["complete"] else
                                                   f"INCOMPLETE (replicas {used['replicas']} of {used['replicas_total']})"))
    if mis:
        print(f"{args.setting} / {args.solver}: mislabel recall@10..50% "
              + " ".join(f"{mis[f'recall_{p}']:.3f}" for p in (10, 20, 30, 40, 50)) + f", AUC {mis['auc']:.3f}")
    print(f"wrote {runner.run_path(args.setting, args.solver)}")
    return 0


def _cmd_leaderboard(args) -> int:
    from . import leaderboard

    if args.dry_run:
        leaderboard.update(args.setting, args.solver, include_incomplete=args.include_incomplete, dry_run=True)
        return 0
    leaderboard.build(rerun=not args.no_rerun, include_incomplete=args.include_incomplete, settings=args.setting,
                      solvers=args.solver, device=args.device, make_figures=not args.no_figures)
    return 0


def _cmd_regress(args) -> int:
    from . import regress

    settings = args.setting or list(regress.REGRESS_SETTINGS)
    if args.update:
        default = "left out of the CI check to keep it within its time budget"
        exclude = dict((e.split("=", 1) + [default])[:2] for e in args.exclude or [])
        regress.record(settings, args.solver, exclude=exclude, device=args.device)
        return 0
    ok = regress.report(regress.check(settings=settings, solvers=args.solver, device=args.device))
    return 0 if ok else 1


def _cmd_lds(args) -> int:
    from . import leaderboard

    print(leaderboard.table1(args.setting, args.solver or ["ekfac"], force=args.force, device=args.device,
                             search_queries=args.search_queries))
    return 0


def _cmd_gap(args) -> int:
    from . import gapstudy

    for solver in args.solver or ["ekfac"]:
        rec = gapstudy.run(args.setting, solver, params=_params(args.param) or None, ensemble=args.ensemble,
                           dampings=args.damping, version=args.version, device=args.device,
                           report_queries=args.report)
        print(gapstudy.format_table(rec))
    return 0


def _cmd_mislabel(args) -> int:
    from . import leaderboard, mislabel

    spec = mislabel.Spec(fraction=args.fraction, seed=args.seed, full_models=args.full_models, epochs=args.epochs)
    if args.build and not args.solver:
        mislabel.build(args.setting, spec, device=args.device)
        return 0
    print(leaderboard.mislabel_table(args.setting, args.solver or ["ekfac"], spec=spec, build=True, force=args.force,
                                     device=args.device))
    return 0


def _cmd_figures(args) -> int:
    from . import figures

    solvers = args.solver or ["ekfac"]
    figures.influence_grid(args.setting, solvers, args.query, n_queries=args.n_queries, device=args.device)
    for name in solvers:
        figures.self_influence_top(args.setting, name, top=args.top, device=args.device)
    return 0


def _cmd_solvers(args) -> int:
    from . import solver_api

    for name, cls in solver_api.available().items():
        limit = f"max {cls.max_params:,} parameters" if cls.max_params is not None else "no parameter limit"
        print(f"{name:10s} {cls.description} ({limit})")
        for key, default in cls.defaults.items():
            grid = f"  grid {cls.parameters[key]}" if key in cls.parameters else ""
            print(f"{'':10s}   {key} = {default!r}{grid}")
    print("every solver also takes: " + ", ".join(f"{k} = {v!r}" for k, v in solver_api.COMMON_OPTIONS.items())
          + " (last_blocks=k: influence through the model's last k blocks and head only)")
    return 0


def _cmd_ihvp_error(args) -> int:
    from . import ihvp_error

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.replot:
        print(f"wrote {ihvp_error.replot()}")
        return 0
    ihvp_error.run(args.setting or None, args.solver or None, args.damping or None, args.queries)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdabench", description="Benchmark of influence-function solvers for "
                                "training-data attribution (LDS, mislabel detection, IHVP error, cost).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("settings", help="list the settings with their recipes and default protocols")
    s.set_defaults(func=_cmd_settings)

    s = sub.add_parser("solvers", help="list the solvers found in solvers/ with their parameters and limits")
    s.set_defaults(func=_cmd_solvers)

    s = sub.add_parser("ihvp-error", help="IHVP error of every solver vs the exact damped inverse -> results/ihvp_error.csv")
    s.add_argument("--setting", action="append", help="setting (repeatable; default: mnist-lr and mnist-mlp-small)")
    s.add_argument("--solver", action="append", help="solver (repeatable; default: all)")
    s.add_argument("--damping", action="append", type=float, help="damping λ (repeatable; default: the solvers' grid)")
    s.add_argument("--queries", type=int, default=100, help="test-query gradients (default 100)")
    s.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy machine)")
    s.add_argument("--replot", action="store_true", help="only redraw the figure from results/ihvp_error*.csv")
    s.set_defaults(func=_cmd_ihvp_error)

    s = sub.add_parser("data", help="fetch and verify a setting's data files")
    s.add_argument("setting", nargs="+")
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser("gt", help="build, resume, extend or verify a ground-truth artifact")
    s.add_argument("setting")
    s.add_argument("--verify", action="store_true", help="verify the newest (or --version) artifact and print a summary")
    s.add_argument("--require-complete", action="store_true", help="with --verify: exit 3 if the artifact is incomplete")
    s.add_argument("--study", action="store_true",
                   help="a study artifact (e.g. --seed-policy varied) under results/gt-studies/, which the benchmark "
                        "never uses as its ground truth; implied by a derived setting such as mnist-cnn@epochs=3")
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
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where units run: this machine (default) or a Ray cluster (pip install 'tdabench[distributed]')")
    s.add_argument("--address", help="with --executor ray: the cluster's address, e.g. HEAD:6379 or 'auto' "
                   "(default: start a Ray instance on this machine)")
    s.add_argument("--gpus-per-task", type=float, default=0.0,
                   help="with --executor ray: GPUs per unit; a fraction lets several small models share a GPU")
    s.add_argument("--cpus-per-task", type=float, default=1.0, help="with --executor ray: CPUs per unit")
    s.add_argument("--max-retries", type=int, default=3,
                   help="with --executor ray: reruns of a unit whose worker or node died")
    s.add_argument("--models-per-job", type=int, default=100, help="models trained together by vmap")
    s.add_argument("--max-units", type=int, help="stop after this many units (the artifact stays incomplete)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_gt)

    s = sub.add_parser("zoo", help="train explained models with per-epoch checkpoints -> results/models/<setting>/")
    s.add_argument("setting")
    s.add_argument("--models", type=int, default=8, help="models the zoo should hold (it only grows; default 8)")
    s.add_argument("--base-seed", type=int, default=0)
    s.add_argument("--device")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core on CPU)")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_zoo)

    s = sub.add_parser("run", help="evaluate one solver on one setting (LDS, mislabel) -> results/runs/<setting>/<solver>.json")
    s.add_argument("--setting", required=True)
    s.add_argument("--solver", required=True, help="a solver name (`tdabench solvers`) or baseline-random / baseline-loss")
    s.add_argument("--param", action="append", metavar="K=V", help="fix a hyper-parameter (not searched); repeatable")
    s.add_argument("--task", action="append", choices=["lds", "mislabel"],
                   help="what to evaluate (default: lds, plus mislabel when its artifact exists)")
    s.add_argument("--no-search", action="store_true", help="use defaults/--param instead of the validation grid search")
    s.add_argument("--search-queries", type=int, help="validation queries used for the grid search (default: all)")
    s.add_argument("--ensemble", type=int, default=1, help="average scores over this many full-data models")
    s.add_argument("--measurement", choices=["margin", "loss"], help="default: the setting's")
    s.add_argument("--version", help="ground-truth version (default: the newest)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("leaderboard", help="rerun what is stale, write results/leaderboard.{csv,md} and figures")
    s.add_argument("--setting", action="append")
    s.add_argument("--solver", action="append")
    s.add_argument("--no-rerun", action="store_true", help="only rewrite the tables from the existing records")
    s.add_argument("--include-incomplete", action="store_true",
                   help="also evaluate on unfinished ground truths (their complete replicas; flagged)")
    s.add_argument("--dry-run", action="store_true", help="list what would be rerun and why")
    s.add_argument("--no-figures", action="store_true")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_leaderboard)

    s = sub.add_parser("regress", help="CI check: attribution quality against results/baselines.json")
    s.add_argument("--update", action="store_true", help="re-measure and rewrite the baselines (review the diff!)")
    s.add_argument("--exclude", action="append", metavar="SOLVER",
                   help="with --update: leave a solver out, optionally saying why (SOLVER=REASON)")
    s.add_argument("--setting", action="append")
    s.add_argument("--solver", action="append")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_regress)

    s = sub.add_parser("lds", help="Table 1: LDS ± se, noise ceiling and the paper's value (reuses fresh run records)")
    s.add_argument("setting")
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--force", action="store_true", help="recompute even when a fresh run record exists")
    s.add_argument("--search-queries", type=int, help="validation queries used for the grid search (default: all)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_lds)

    s = sub.add_parser("gap", help="Table 1 gap study: LDS vs target replicas, ensemble, measurement, damping "
                                   "(validation queries) -> results/gap/")
    s.add_argument("setting")
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--param", action="append", metavar="K=V",
                   help="fix a hyper-parameter (default: those chosen on validation queries in the run record)")
    s.add_argument("--ensemble", type=int, help="largest ensemble of full-data models (default: all of them)")
    s.add_argument("--damping", type=float, action="append",
                   help="a further damping to measure on the first model (repeatable), e.g. below the grid")
    s.add_argument("--report", action="store_true",
                   help="then evaluate the protocol chosen on validation on the reported queries (reuses a stored "
                        "study of the same artifact, and a stored evaluation of the same protocol on the same "
                        "ground-truth files and solver code)")
    s.add_argument("--version", help="ground-truth version (default: the newest)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_gap)

    s = sub.add_parser("mislabel", help="mislabel detection: build the corrupted-label model, rank, print recall")
    s.add_argument("setting")
    s.add_argument("--build", action="store_true", help="only build the corrupted-label artifact (unless --solver)")
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--full-models", type=int, default=1)
    s.add_argument("--epochs", type=int, help="train the corrupted model this many epochs (a study; not on the leaderboard)")
    s.add_argument("--force", action="store_true")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_mislabel)

    s = sub.add_parser("figures", help="qualitative figures: influential train images per query, top self-influence")
    s.add_argument("setting")
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--query", type=int, action="append", help="test-set index of a query (default: a seeded choice)")
    s.add_argument("--n-queries", type=int, default=3)
    s.add_argument("--top", type=int, default=20, help="self-influence images shown")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_figures)
    return p


def main(argv=None) -> int:
    from .artifacts import ArtifactError
    from .data import DataError
    from .deps import MissingDependency
    from .executors import ExecutorError
    from .regress import RegressionError
    from .runner import RunError
    from .solver_api import SolverError

    args = build_parser().parse_args(argv)
    # torch's own forward-mode decompositions (torch/_decomp/decompositions_for_jvp.py) script a graph on
    # first use and warn that torch.jit.script is deprecated; nothing here can act on it.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    try:
        return args.func(args)
    except (ArtifactError, DataError, KeyError, ValueError, RunError, RegressionError, SolverError,
            FileNotFoundError, MissingDependency, ExecutorError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tdabench: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
