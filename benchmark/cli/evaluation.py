"""Floor 7: evaluating solvers — one run, Table 1 (recomputed or committed), the leaderboard, the CI check."""

from __future__ import annotations

from . import report, resolve

EXPLAIN = {"gt": "ground truth", "zoo": "zoo"}


def _cmd_run(args) -> int:
    from ..evaluate import campaign, records

    store = resolve.store(args)
    setting, method = resolve.setting(args.setting), resolve.method(args.solver)
    try:
        old = records.read_record(store, setting.name, method.name, args.ensemble)
    except records.RecordError:
        old = None  # a refused record is what this run replaces (records.run says so)
    explain = EXPLAIN[args.explain] if args.explain else campaign.default_explain(store, setting, method, old)
    rec = records.run(store, setting, method, resolve.params(args.param), tasks=args.task, search=not args.no_search,
                      search_queries=args.search_queries, ensemble=args.ensemble, explain=explain,
                      measurement=args.measurement, version=args.version, device=args.device)
    lds, mis = rec.get("lds"), rec.get("mislabel")
    if lds:
        used = lds["ground_truth"]
        state = "complete" if used["complete"] else f"INCOMPLETE (replicas {used['replicas']} of {used['replicas_total']})"
        if lds.get("mean") is None:
            print(f"{setting.name} / {method.name}: LDS undefined — {lds.get('undefined')}")
        else:
            print(f"{setting.name} / {method.name}: LDS {lds['mean']:.4f} ± {lds['se']:.4f} [{lds['ci_low']:.4f}, "
                  f"{lds['ci_high']:.4f}] on {lds['queries']} queries, params {lds.get('params')}; ground truth "
                  f"{used['version']} {state}")
    if mis:
        print(f"{setting.name} / {method.name}: mislabel recall@10..50% "
              + " ".join(f"{mis[f'recall_{p}']:.3f}" for p in (10, 20, 30, 40, 50)) + f", AUC {mis['auc']:.3f}")
    print(f"wrote {records.run_path(store, setting.name, method.name, args.ensemble)}")
    return 0


def _cmd_lds(args) -> int:
    """Table 1 recomputed from the committed ground truth, beside the committed record and the paper."""
    from ..report import tables
    from ..studies import table1

    store, setting = resolve.store(args, reading=True), resolve.setting(args.setting)
    exit_code = 0
    for name in args.solver or ["ekfac"]:
        result = table1.recompute(store, setting, resolve.solver(name), explain=EXPLAIN.get(args.explain),
                                  device=args.device, search_queries=args.search_queries)
        print(tables.table1_recomputed(setting, result))
        if result["comparison"] and not result["comparison"]["agree"]:
            exit_code = 1
    return exit_code


def _cmd_table1(args) -> int:
    """The committed Table 1 records, displayed without recomputing (each marked current or stale)."""
    from ..report import tables
    from ..studies import table1

    store, setting = resolve.store(args, reading=True), resolve.setting(args.setting)
    methods = [resolve.solver(n) for n in args.solver or ["ekfac"]]
    print(tables.table1_committed(setting, table1.committed(store, setting, methods),
                                  table1.gap_reported(store, setting, methods)))
    return 0


def _cmd_leaderboard(args) -> int:
    from ..evaluate import campaign, registry
    from ..report import figures, leaderboard

    store = resolve.store(args, reading=args.dry_run or args.no_rerun)  # those only read the records
    chosen = resolve.settings(args.setting)
    methods = [resolve.method(n) for n in args.solver] if args.solver else campaign.leaderboard_methods(
        registry.available())
    if args.dry_run:
        campaign.update(store, chosen, methods, include_incomplete=args.include_incomplete, dry_run=True)
        return 0
    failures, before = {}, report.snapshot(store)
    if not args.no_rerun:
        store.check_writable(store.runs, store.figures)
        _, failures = campaign.update(store, chosen, methods, include_incomplete=args.include_incomplete,
                                      device=args.device)
    # The tables always hold every setting and solver: rerunning a few rows never drops the others.
    df, found = leaderboard.collect(store, campaign.leaderboard_settings(),
                                    campaign.leaderboard_methods(registry.available()), failures=failures)
    leaderboard.write(store, df)
    if not args.no_figures:
        for p in figures.leaderboard(df, found, store.figures):
            print(f"wrote {p}")
    report.write_report(store)  # the report says what the tables say, always
    report.print_files_to_commit(store, before)  # what to commit: docs/writing-a-solver.md
    return 0


def _row_method(store, setting, name: str):
    """What a row's staleness is checked with: its solver class or baseline, or, for a row of external scores
    (`tdabench evaluate --scores`), the external marker (no solver code to fingerprint)."""
    from ..evaluate import external, records

    path = records.run_path(store, setting.name, name)
    if path.is_file():
        rec = records.read_record(store, setting.name, name)
        if external.is_external(rec):
            return external.method_of(rec)
    return resolve.method(name)


def _cmd_compare(args) -> int:
    """Leaderboard rows side by side: LDS, and the paired difference from the first row, query by query."""
    from ..evaluate import records
    from ..report import tables

    store, setting = resolve.store(args, reading=True), resolve.setting(args.setting)
    methods = {name: _row_method(store, setting, name) for name in {records.parse_row_name(r)[0] for r in args.rows}}
    print(tables.compare_table(setting, records.compare_rows(store, setting, args.rows, methods)))
    return 0


def _cmd_regress(args) -> int:
    from ..studies import regress

    store = resolve.store(args, reading=not args.update)
    settings = [resolve.setting(n) for n in args.setting or regress.REGRESS_SETTINGS]
    if args.update:
        default = "left out of the CI check to keep it within its time budget"
        exclude = dict((e.split("=", 1) + [default])[:2] for e in args.exclude or [])
        regress.record(store, settings, resolve.solvers(args.solver), exclude=exclude,
                       params_from_records=args.params_from_records, device=args.device)
        return 0
    ok = regress.report(regress.check(store, settings, resolve.solvers(args.solver), device=args.device))
    return 0 if ok else 1


def add_commands(sub) -> None:
    s = sub.add_parser("run", help="evaluate one solver on one setting (LDS, mislabel) -> results/runs/<setting>/<solver>.json; use it for one "
                                   "row, `leaderboard` for every missing or stale one")
    s.add_argument("--setting", required=True, help=resolve.SETTING_HELP)
    s.add_argument("--solver", required=True, help="a solver name (`tdabench solvers`) or baseline-random / baseline-loss")
    s.add_argument("--param", action="append", metavar="K=V", help="fix a hyper-parameter (not searched); repeatable")
    s.add_argument("--task", action="append", choices=["lds", "mislabel"],
                   help="what to evaluate (default: lds, plus mislabel when its artifact exists)")
    s.add_argument("--no-search", action="store_true", help="use defaults/--param instead of the validation grid search")
    s.add_argument("--search-queries", type=int, help="validation queries used for the grid search (default: all)")
    s.add_argument("--ensemble", type=int, default=1,
                   help="average scores over this many explained models; n > 1 writes the row <solver>-ens<n> beside "
                        "the single-model one (LDS only)")
    s.add_argument("--explain", choices=sorted(EXPLAIN),
                   help="explain the ground truth's full-data models (gt; model k shares its seed with target "
                        "replica k) or the zoo's (zoo; independent of every replica). Default: as in the existing "
                        "record; for a new one the zoo where the setting has one (the uncoupled protocol), else gt")
    s.add_argument("--measurement", choices=["margin", "loss"], help="default: the setting's")
    s.add_argument("--version", help="ground-truth version (default: the newest)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("compare", help="rows of one setting side by side: LDS and the paired per-query difference "
                                       "from the first row (where both score the same queries and target, "
                                       "explaining models of the same artifact)")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("rows", nargs="+", metavar="ROW", help="leaderboard rows (solver names; <solver>-ens<n> for an "
                                                        "ensemble); the first is the reference")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("lds", help="Table 1 RECOMPUTED from the committed ground truth, beside the committed record "
                                   "and the paper (exit 1 when they disagree beyond the standard error); use it to "
                                   "check a number yourself (minutes); never writes a record")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.add_argument("--search-queries", type=int, help="validation queries used for the grid search (default: all)")
    s.add_argument("--explain", choices=sorted(EXPLAIN),
                   help="explained model from the ground truth (gt) or the zoo (zoo); default: as in the committed "
                        "record, so the two are comparable")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_lds)

    s = sub.add_parser("table1", help="Table 1 from the COMMITTED run records, without recomputing (marks stale ones); "
                                   "use it to read the numbers (seconds)")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--solver", action="append", help="default: ekfac")
    s.set_defaults(func=_cmd_table1)

    s = sub.add_parser("leaderboard", help="rerun what is missing or stale, write results/leaderboard.{csv,md}, "
                                          "figures and the report (results/report/); use it after "
                                          "adding a solver or changing code (--dry-run: the plan)")
    s.add_argument("--setting", action="append", help="rerun only these settings (the tables keep every row)")
    s.add_argument("--solver", action="append", help="rerun only these solvers (the tables keep every row)")
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
    s.add_argument("--params-from-records", action="store_true",
                   help="with --update: take each solver's hyper-parameters from its committed run record (chosen "
                        "there on the validation queries) instead of a grid search")
    s.add_argument("--setting", action="append", help="check only these settings (repeatable; default: the CI set, "
                   "regress.REGRESS_SETTINGS)")
    s.add_argument("--solver", action="append")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_regress)

