"""Floor 7: studies — the gap study, mislabel detection, IHVP error, unrolling error, the qualitative figures."""

from __future__ import annotations

from . import resolve


def _cmd_gap(args) -> int:
    from ..report import figures, tables
    from ..studies import gap

    store, setting = resolve.store(args), resolve.setting(args.setting)
    for name in args.solver or ["ekfac"]:
        rec = gap.run(store, setting, resolve.solver(name), params=resolve.params(args.param) or None,
                      ensemble=args.ensemble, dampings=args.damping, version=args.version, device=args.device,
                      report_queries=args.report)
        fig = figures.gap_study(rec, store.figures / f"{setting.name}_gap_{name}.png", setting.paper_lds)
        print(f"wrote {store.relative(fig)}")
        print(tables.gap_table(rec))
    return 0


def _cmd_mislabel(args) -> int:
    from ..groundtruth import mislabel
    from ..report import tables
    from ..studies import mislabel as mislabel_study

    store, setting = resolve.store(args), resolve.setting(args.setting)
    spec = mislabel.Spec(fraction=args.fraction, seed=args.seed, full_models=args.full_models, epochs=args.epochs)
    if args.build and not args.solver:
        mislabel.build(setting, spec, store=store, device=args.device)
        return 0
    methods = [resolve.solver(n) for n in args.solver or ["ekfac"]]
    manifest, rows = mislabel_study.rows(store, setting, methods, spec, build=True, force=args.force,
                                         device=args.device)
    print(tables.mislabel_table(setting, manifest, rows, spec))
    return 0


def _cmd_ihvp_error(args) -> int:
    import pandas as pd

    from ..report import figures
    from ..studies import ihvp_error

    store = resolve.store(args)
    figure = store.figures / "ihvp_error.png"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.replot:
        csv, lissa_csv = ihvp_error.csv_paths(store)
        print(f"wrote {figures.ihvp_error(pd.read_csv(csv), pd.read_csv(lissa_csv), figure)}")
        return 0
    settings = [resolve.setting(n) for n in args.setting or ihvp_error.SETTINGS]
    df, lissa = ihvp_error.run(store, settings, resolve.solvers(args.solver), args.damping or None, args.queries)
    print(f"wrote {figures.ihvp_error(df, lissa, figure)}")
    return 0


def _cmd_unroll_error(args) -> int:
    from ..studies import unroll_error

    store = resolve.store(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for name in args.setting or unroll_error.SETTINGS:
        unroll_error.run(store, resolve.setting(name), resolve.solver("unrolled"),
                         [resolve.solver(n) for n in args.solver or ["source", "ekfac", "identity"]],
                         queries=args.queries, model=args.model, reference_epochs=args.reference_epochs,
                         device=args.device)
    print(f"wrote {store.relative(unroll_error.csv_path(store))}")
    return 0


def _cmd_figures(args) -> int:
    """The qualitative study (which training images each solver blames) and its figures."""
    from ..report import figures
    from ..studies import qualitative

    store, setting = resolve.store(args), resolve.setting(args.setting)
    data = setting.data()
    items = []
    for name in args.solver or ["ekfac"]:
        cls = resolve.solver(name)
        inf = qualitative.influential(store, setting, cls, args.query, n_queries=args.n_queries, top=args.top_k,
                                      device=args.device)
        # self-influence is a pass over every training point per point (an hour for CG/LiSSA on 2 cores); the
        # gallery needs only the influential images, so it can be skipped, keeping what the file already holds
        selfs = None if args.no_self_influence else qualitative.self_influence(store, setting, cls, top=args.top,
                                                                                device=args.device)
        print(f"wrote {store.relative(qualitative.save(store, setting, cls, inf, selfs))}")
        items.append(inf)
        if selfs is not None:
            out = figures.self_influence_top(data, selfs, store.figures / f"{setting.name}_self_influence_{name}.png")
            print(f"wrote {store.relative(out)}")
    out = figures.influence_grid(data, items, store.figures / f"{setting.name}_influential.png")
    print(f"wrote {store.relative(out)}")
    return 0


def _cmd_ceiling(args) -> int:
    """The noise ceiling's bias on every committed ground truth, and the corrected ceiling (issue 35)."""
    from ..core.stats import CeilingSimulation
    from ..studies import ceiling

    store = resolve.store(args)
    given = {k: v for k, v in (("repeats", args.repeats), ("seed", args.seed)) if v is not None}
    study = ceiling.CeilingStudy(settings=tuple(resolve.setting(n) for n in args.setting or ()),
                                 simulation=CeilingSimulation(**given))
    doc = ceiling.run(store, study)
    print(f"wrote {store.relative(ceiling.path(store))} ({', '.join(doc['settings'])})")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("gap", help="Table 1 gap study: LDS vs target replicas, ensemble, measurement, damping "
                                   "(validation queries) -> results/gap/")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--param", action="append", metavar="K=V",
                   help="fix a hyper-parameter (default: those chosen on validation queries in the run record)")
    s.add_argument("--ensemble", type=int, help="largest ensemble of full-data models (default: all of them)")
    s.add_argument("--damping", type=float, action="append",
                   help="a further damping to measure on the first model (repeatable), e.g. below the grid")
    s.add_argument("--report", action="store_true",
                   help="then evaluate the protocol chosen on validation on the reported queries (reuses a stored "
                        "study of the same artifact, and a stored evaluation of the same protocol while it is current)")
    s.add_argument("--version", help="ground-truth version (default: the newest)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_gap)

    s = sub.add_parser("mislabel", help="mislabel detection: build the corrupted-label model, rank, print recall")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--build", action="store_true", help="only build the corrupted-label artifact (unless --solver)")
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--full-models", type=int, default=1)
    s.add_argument("--epochs", type=int, help="train the corrupted model this many epochs (a study; not on the leaderboard)")
    s.add_argument("--force", action="store_true")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_mislabel)

    s = sub.add_parser("ihvp-error", help="IHVP error of every solver vs the exact damped inverse -> results/ihvp_error.csv")
    s.add_argument("--setting", action="append", help="setting (repeatable; default: mnist-lr and mnist-mlp-small)")
    s.add_argument("--solver", action="append", help="solver (repeatable; default: all)")
    s.add_argument("--damping", action="append", type=float, help="damping λ (repeatable; default: the solvers' grid)")
    s.add_argument("--queries", type=int, default=100, help="test-query gradients (default 100)")
    s.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy machine)")
    s.add_argument("--replot", action="store_true", help="only redraw the figure from results/ihvp_error*.csv")
    s.set_defaults(func=_cmd_ihvp_error)

    s = sub.add_parser("unroll-error", help="scores of SOURCE and other solvers vs exact unrolled differentiation of "
                                            "the zoo model's SGD run -> results/unroll_error.csv")
    s.add_argument("--setting", action="append", help="setting (repeatable; default: mnist-lr and mnist-mlp-small)")
    s.add_argument("--solver", action="append", help="solver (repeatable; default: source, ekfac, identity)")
    s.add_argument("--queries", type=int, default=200, help="reported queries, a seeded subset (default 200)")
    s.add_argument("--model", type=int, default=0, help="the zoo model explained (default 0, as `run --explain zoo`)")
    s.add_argument("--reference-epochs", type=int, metavar="K",
                   help="differentiate the reference through the last K epochs only (default: all of training; "
                        "where early training's linearised dynamics are unstable the full reference explodes)")
    s.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy machine)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_unroll_error)

    s = sub.add_parser("figures", help="qualitative: the training images each solver blames per query, and the top "
                                       "self-influence images -> results/qualitative/, results/figures/")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--query", type=int, action="append", help="test-set index of a query (default: a seeded choice)")
    s.add_argument("--n-queries", type=int, default=3)
    s.add_argument("--top-k", type=int, default=5, help="most helpful / harmful images shown per query")
    s.add_argument("--top", type=int, default=20, help="self-influence images shown")
    s.add_argument("--no-self-influence", action="store_true",
                   help="only the influential images per query (what the report's gallery shows); keeps the "
                        "self-influence already in results/qualitative/")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_figures)

    s = sub.add_parser("ceiling", help="the noise ceiling's bias from a simulation calibrated to each committed ground "
                                       "truth, and the corrected ceiling -> results/ceiling.json (seconds per setting)")
    s.add_argument("--setting", action="append", help="setting (repeatable; default: every committed ground truth)")
    s.add_argument("--repeats", type=int, help="simulated ground truths for the bias (default: 24)")
    s.add_argument("--seed", type=int, help="the simulation's seed (default: 0)")
    s.set_defaults(func=_cmd_ceiling)
