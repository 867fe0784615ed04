"""Floor 7: what is here — settings, solvers (and broken solver files), data."""

from __future__ import annotations

from . import resolve


def _cmd_settings(args) -> int:
    from ..setup import settings
    from ..setup.data import DataError
    from ..setup.deps import MissingDependency

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
    for path, error in settings.broken().items():
        print(f"BROKEN dataset file {path}: {error}")
    return 0


def _cmd_solvers(args) -> int:
    from ..evaluate import registry
    from ..evaluate.solver import COMMON_OPTIONS

    for name, cls in registry.available().items():
        limit = f"max {cls.max_params:,} parameters" if cls.max_params is not None else "no parameter limit"
        lacks = [what for what, has in (("IHVP", cls.has_ihvp()), ("self-influence", cls.has_self_influence)) if not has]
        print(f"{name:10s} {cls.description} ({limit}{'; no ' + ', no '.join(lacks) if lacks else ''})")
        if cls.unavailable():
            print(f"{'':10s}   UNAVAILABLE here: {cls.unavailable()}")
        for key, default in cls.defaults.items():
            grid = f"  grid {cls.parameters[key]}" if key in cls.parameters else ""
            print(f"{'':10s}   {key} = {default!r}{grid}")
    print("every solver also takes: " + ", ".join(f"{k} = {v!r}" for k, v in COMMON_OPTIONS.items())
          + " (last_blocks=k: influence through the model's last k blocks and head only)")
    for path, error in registry.broken().items():
        print(f"BROKEN solver file {path}: {error} (left out; the other solvers work)")
    return 0


def _cmd_data(args) -> int:
    for name in args.setting:
        s = resolve.setting(name)
        d = s.data()
        print(f"{name}: train {tuple(d.train_x.shape)}, test {tuple(d.test_x.shape)}, {d.num_classes} classes (verified)")
        if s.requires:  # settings on timm models may start from pretrained weights: fetch those too
            print(f"{name}: model {s.model_spec()['parameters']:,} parameters (builds here)")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("settings", help="list the settings with their recipes and default protocols")
    s.set_defaults(func=_cmd_settings)

    s = sub.add_parser("solvers", help="list the solvers found in solvers/ with their parameters and limits")
    s.set_defaults(func=_cmd_solvers)

    s = sub.add_parser("data", help="fetch and verify a setting's data files")
    s.add_argument("setting", nargs="+", help=resolve.SETTING_HELP)
    s.set_defaults(func=_cmd_data)
