"""Floor 7: datamodels — ridge regression on retrained subset models as an attribution, the frontier's far end."""

from __future__ import annotations

from . import resolve

DEFAULT_MODELS = (100, 300, 1000, 3000)


def _cmd_datamodels(args) -> int:
    from ..groundtruth import artifact as gt_artifact
    from ..groundtruth import datamodel_models

    store, setting = resolve.store(args), resolve.setting(args.setting)
    if args.show:
        from ..studies import datamodels

        result = datamodels.read(store, setting)
        if result is None:
            print(f"no datamodels result for {setting.name}; compute it with `tdabench datamodels {setting.name}`")
            return 1
        why = datamodels.stale_reasons(result, store, setting)
        # the verdict first: numbers that are no longer current are never read as if they were
        print(f"STALE, rerun `tdabench datamodels {setting.name}`: {'; '.join(why)}" if why else "current")
        print(datamodels.table(result))
        return 0
    sizes = tuple(sorted(set(args.models or DEFAULT_MODELS)))
    gt = gt_artifact.load(store, setting)
    spec = datamodel_models.Spec(models=max(sizes), base_seed=args.base_seed, chunk=args.chunk)
    if not args.no_train:
        datamodel_models.build(setting, spec, store=store, gt=gt, max_models=args.max_models,
                               progress=not args.quiet)
    if args.train_only:
        return 0
    from ..studies import datamodels

    result = datamodels.run(store, setting, datamodels.Options(sizes=sizes, spec=spec), gt=gt,
                            progress=not args.quiet)
    path = datamodels.write(store, setting, result)
    print(f"wrote {store.relative(path)}")
    print(datamodels.table(result))
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("datamodels", help="datamodels: ridge regression of each query's margin on the subset masks of "
                                          "retrained alpha-subset models -> results/datamodels/ (resumable)")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--models", type=int, nargs="+", metavar="N",
                   help=f"numbers of retrained models to fit on (default: {' '.join(map(str, DEFAULT_MODELS))}); "
                        f"the largest is how many are trained")
    s.add_argument("--base-seed", type=int, default=0, help="base of the subset and seed draws, in their own "
                                                            "namespace apart from every ground truth (default 0)")
    s.add_argument("--chunk", type=int, default=100, help="models a file holds, the unit of resuming (default 100)")
    s.add_argument("--max-models", type=int, help="train at most about this many models now (rerun to continue)")
    s.add_argument("--train-only", action="store_true", help="train the models, fit nothing")
    s.add_argument("--no-train", action="store_true", help="fit on the models already trained (the sizes they allow)")
    s.add_argument("--show", action="store_true", help="print the committed result and whether it is current "
                                                       "(computes nothing)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_datamodels)
