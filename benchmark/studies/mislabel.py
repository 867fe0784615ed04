"""Floor 5: mislabel detection as a study — any corruption spec (fraction, seed, shorter training), ranked by
each solver's self-influence and by the baselines.

The leaderboard's corruption (10% flipped, seed 0) is evaluated through the run records (so it is computed once
and kept current); other specs are studies, computed here and printed, never mixed into the leaderboard.
"""

from __future__ import annotations

from ..evaluate import campaign, engine, records
from ..evaluate.engine import BASELINES, Baseline
from ..groundtruth import mislabel as mislabel_mod
from ..setup import settings as settings_mod
from ..setup.store import ResultsStore


def rows(store: ResultsStore, setting: settings_mod.Setting, methods: list, spec: mislabel_mod.Spec, *,
         build: bool = True, force: bool = False, device=None, log=print) -> tuple[dict, list]:
    """(the corrupted-label artifact's manifest, [(method name, mislabel section)]) for ``methods`` and the
    baselines, building the artifact first when asked."""
    if mislabel_mod.find(store, setting, spec) is None:
        if not build:
            raise FileNotFoundError(f"no mislabel artifact for {setting.name!r} with {spec}; build it with "
                                    f"`tdabench mislabel {setting.name} --build`")
        mislabel_mod.build(setting, spec, store=store, device=device, log=log)
    art = mislabel_mod.load(store, setting, spec)
    out = []
    for method in list(methods) + list(BASELINES.values()):
        if spec == records.MISLABEL_SPEC:  # the leaderboard's corruption: recorded in the run records
            rec = campaign.ensure_record(store, setting, method, ["mislabel"], force=force, device=device, log=log)
            out.append((method.name, rec["mislabel"]))
        else:
            params = None if isinstance(method, Baseline) else records.chosen_params(store, setting, method)[0]
            out.append((method.name, engine.evaluate_mislabel(art, method, params, device=device)))
    return art.manifest, out
