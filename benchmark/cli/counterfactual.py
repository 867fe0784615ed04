"""Floor 7: counterfactual retraining — remove-top-k, and Newton unlearning / label repair against retraining."""

from __future__ import annotations

from . import resolve
from .groundtruth import _executor, _ray_options


def _cmd_counterfactual(args) -> int:
    from ..report import figures, tables
    from ..studies import counterfactual

    store, setting = resolve.store(args), resolve.setting(args.setting)
    methods = [resolve.solver(n) for n in args.solver or ["ekfac"]]
    result = counterfactual.run(store, setting, methods, queries=args.queries, ks=tuple(args.k or counterfactual.K_GRID),
                                seeds=args.seeds, executor=_executor(args), device=args.device,
                                units_per_job=args.units_per_job, max_units=args.max_units, progress=not args.quiet)
    for path in counterfactual.write(store, result).values():
        print(f"wrote {store.relative(path)}")
    fig = figures.remove_top_k(result["summary"], store.figures / f"{setting.name}_remove_top_k.png")
    print(f"wrote {store.relative(fig)}")
    print(tables.remove_top_k_table(result["summary"], result["meta"]))
    return 0


def _cmd_unlearning(args) -> int:
    from ..report import figures, tables
    from ..studies import unlearning

    store, setting = resolve.store(args), resolve.setting(args.setting)
    methods = [resolve.solver(n) for n in args.solver or ["ekfac"]]
    result = unlearning.run(store, setting, methods, rank_by=resolve.solver(args.rank_by),
                            sizes=tuple(args.size or unlearning.SIZES), seeds=args.seeds, executor=_executor(args),
                            device=args.device, units_per_job=args.units_per_job, max_units=args.max_units,
                            progress=not args.quiet)
    for path in unlearning.write(store, result).values():
        print(f"wrote {store.relative(path)}")
    fig = figures.unlearning(result["summary"], result["meta"], store.figures / f"{setting.name}_unlearning.png")
    print(f"wrote {store.relative(fig)}")
    print(tables.unlearning_table(result["summary"], result["meta"]))
    return 0


def _common(s) -> None:
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--solver", action="append", help="solver (repeatable; default: ekfac), with the hyper-parameters "
                                                     "chosen for LDS in its run record (else its defaults)")
    s.add_argument("--seeds", type=int, default=2, help="retraining seeds per experiment; seed 0 is the explained "
                                                        "model's own (default 2)")
    s.add_argument("--device")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core on CPU)")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    _ray_options(s)
    s.add_argument("--units-per-job", type=int, default=1, help="models one job trains in a row (more for tiny models)")
    s.add_argument("--max-units", type=int, help="train at most this many models now (the artifact stays incomplete; "
                                                 "rerun to continue)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub) -> None:
    s = sub.add_parser("counterfactual", help="remove-top-k: retrain without each solver's most influential points "
                                              "for a query -> results/counterfactual/ (resumable)")
    _common(s)
    s.add_argument("--queries", type=int, default=20, help="reported queries, a seeded sample of those the explained "
                                                           "model gets right (default 20)")
    s.add_argument("--k", type=int, action="append", help="points removed (repeatable; default 10 30 100 300 1000)")
    s.set_defaults(func=_cmd_counterfactual)

    s = sub.add_parser("unlearning", help="Newton removal and label repair on the corrupted-label model vs retraining "
                                          "-> results/unlearning/ (resumable)")
    _common(s)
    s.add_argument("--size", type=float, action="append",
                   help="forget-set size as a fraction of the training set (repeatable; default 0.001 0.005 0.01 0.05)")
    s.add_argument("--rank-by", default="ekfac", help="solver whose self-influence ranks the 'self-influence' forget "
                                                      "sets (default ekfac)")
    s.set_defaults(func=_cmd_unlearning)
