"""Floor 7: external scores — a score matrix computed by another program, evaluated like every leaderboard row
(``tdabench evaluate SETTING --scores FILE --name NAME``), or on the validation queries for tuning (``--validation``,
never written)."""

from __future__ import annotations

from . import resolve


def _cmd_evaluate(args) -> int:
    from ..evaluate import external

    setting = resolve.setting(args.setting)
    if args.validation:
        if args.self_scores:
            raise ValueError("--self-scores with --validation: mislabel detection has no validation split (its "
                             "hyper-parameters are the ones chosen for LDS); drop one of the two")
        store = resolve.store(args, reading=True)
        scores = external.load_scores(args.scores)  # a file that is no score matrix fails before any loading
        bench = external.Bench.load(store, setting, resolve=resolve.method)
        print(bench.evaluate_validation(scores))
        print("nothing written: validation scores are for tuning; evaluate the reported queries' scores with --name")
        return 0
    if not args.name:
        raise ValueError("--name NAME is required: the leaderboard row (and run record) the external scores get; "
                         "or --validation to score validation queries for tuning")
    store = resolve.store(args)
    external.check_name(store, setting, args.name)
    scores = external.load_scores(args.scores)
    self_scores = external.load_scores(args.self_scores) if args.self_scores else None
    bench = external.Bench.load(store, setting, resolve=resolve.method)
    lds = bench.evaluate(scores)
    mislabel = bench.evaluate_mislabel(self_scores) if self_scores is not None else None
    path = external.write_record(bench, args.name, lds, scores, mislabel=mislabel, self_scores=self_scores)
    print(lds)
    if mislabel is not None:
        print(mislabel)
    print(f"wrote {path} ({external.EXTERNAL}, {scores.path.name} sha256 {scores.sha256[:16]}…)")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("evaluate", help="evaluate a score matrix computed elsewhere (external scores): LDS on the "
                                        "reported queries -> results/runs/<setting>/<name>.json, or --validation")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--scores", required=True, metavar="FILE",
                   help="(Q, N) scores, .npy / .pt / .safetensors: row q the reported query tdabench.load(SETTING)"
                        ".queries.reported.indices[q] (the ground truth's queries.npy, in order), column i training "
                        "point i; positive = helpful. With --validation: (V, N) of the validation queries")
    s.add_argument("--name", help="the row and record name of the external method (not a solver's or baseline's)")
    s.add_argument("--self-scores", metavar="FILE",
                   help="(N,) self-influence scores of the corrupted-label model's training points: mislabel recall "
                        "and AUC in the same record")
    s.add_argument("--validation", action="store_true",
                   help="score VALIDATION queries (for tuning); prints the LDS and writes nothing")
    s.set_defaults(func=_cmd_evaluate)
