"""Floor 7: `tdabench frontier` — the cost–quality frontier (LDS against compute for ensembles, checkpoint
ensembles and knob values) -> results/frontier/<setting>.json and results/figures/frontier_<setting>.png."""

from __future__ import annotations

from . import resolve


def _cmd_frontier(args) -> int:
    from ..report import figures
    from ..studies import frontier

    store, setting = resolve.store(args), resolve.setting(args.setting)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.replot:
        doc = frontier.read(store, setting)
        why = frontier.stale_reasons(doc, store, setting)
        if why:
            print(f"note: {store.relative(frontier.frontier_path(store, setting))} is not current: {'; '.join(why)}")
    else:
        families = tuple(frontier.Family.parse(f) for f in (args.family or frontier.DEFAULT_FAMILIES))
        names = sorted({f.solver for f in families} | {frontier.REFERENCE_SOLVER})
        cfg = frontier.FrontierConfig(families=families, device=args.device, progress=not args.quiet,
                                      log=(lambda *a: None) if args.quiet else print)
        if args.members:
            cfg.members = tuple(sorted(set(args.members)))
        if args.checkpoints:
            cfg.checkpoints = tuple(sorted(set(args.checkpoints)))
        if args.combined_checkpoints:
            cfg.combined_checkpoints = args.combined_checkpoints
        doc = frontier.run(store, setting, {n: resolve.solver(n) for n in names}, cfg)
    out = figures.frontier(doc, frontier.figure_path(store, setting), frontier.datamodels_points(store, setting))
    print(frontier.summary_table(doc))
    print(f"wrote {store.relative(out)}")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("frontier", help="the cost-quality frontier: LDS against compute for ensembles of 1..32 zoo "
                                        "models, checkpoint ensembles and knob values -> results/frontier/")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--family", action="append", metavar="SOLVER[:KIND]",
                   help="repeatable: SOLVER (ensembles of zoo models), SOLVER:ckpt (one model's checkpoints), "
                        "SOLVER:ckpt+zoo (both), SOLVER:KNOB=v1,v2 (one model at each knob value, e.g. "
                        "trak:proj_dim=128,2048, arnoldi:rank=512,1024, datainf:damping=1e-6,1e-5); default: ekfac, "
                        "trak, ekfac:ckpt, ekfac:ckpt+zoo")
    s.add_argument("--members", type=int, action="append", metavar="N",
                   help="ensemble size in zoo models (repeatable; default 1 2 4 8 16 32, those the zoo holds)")
    s.add_argument("--checkpoints", type=int, action="append", metavar="C",
                   help="checkpoint-ensemble size (repeatable; default 1 2 4 8, at most the epochs)")
    s.add_argument("--combined-checkpoints", type=int, metavar="C",
                   help="checkpoints per model in SOLVER:ckpt+zoo families (default 4)")
    s.add_argument("--replot", action="store_true", help="only redraw the figure from the committed file")
    s.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy machine)")
    s.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the table")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_frontier)
