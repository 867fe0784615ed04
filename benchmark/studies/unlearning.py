"""Floor 5: Newton unlearning and label repair (the paper's §8), measured against retraining.

The explained model is the mislabel artifact's corrupted-label model (10% of the labels flipped, seed 0; the
leaderboard's): it has points worth forgetting. Forget sets of 0.1%–5% of the training set are drawn three
ways — at random, by top self-influence (one solver's ranking, shared by every update so the retraining is
shared too), and from the truly flipped points (also all of them) — and the flipped subsets are also
*repaired* (given their true labels). Every set is retrained with seeds 0..S-1
(:mod:`benchmark.groundtruth.retrain`; seed 0 is the corrupted model's own), and each update starts from the
full-data model of the same seed and is compared with the model retrained with that seed.

The Newton steps (derived for the benchmark's training objective; docs/counterfactual.md)
-------------------------------------------------------------------------------------------
Training minimises J(θ) = (1/n) Σᵢ L(zᵢ; θ) + (λ/2)‖θ‖² (SGD's weight decay λ is the L2 term), whose curvature is
H = G + λI (G the Gauss-Newton matrix of the mean loss; the solvers' damping plays λ). Retraining without the
m points F minimises the *mean* over the n − m points left, J_F(θ) = 1/(n−m) Σ_{i∉F} L(zᵢ) + (λ/2)‖θ‖².
One Newton step for the change of objective, from θ, with H for the curvature of J_F:

    removal:  θ_new = θ − H⁻¹(∇J_F(θ) − ∇J(θ)) = θ + 1/(n−m) · H⁻¹ Σ_{z∈F} (∇L(z) − ḡ),   ḡ = (1/n) Σᵢ ∇L(zᵢ)

(at the regularised optimum ḡ = −λθ). The issue's form θ + (1/n) Σ_{z∈F} H⁻¹∇L(z) is the step for keeping the
sum's 1/n (J without F's terms, not their mean): it differs by −(m/n)H⁻¹ḡ, a shrinkage of θ by ≈ m/n in the
directions weight decay controls. Label repair keeps n and swaps L(z) for L(z̃):

    repair:   θ_new = θ − H⁻¹(∇J̃(θ) − ∇J(θ)) = θ − (1/n) Σ_{z∈F} H⁻¹(∇L(z̃) − ∇L(z))

The issue writes + for this step; both signs are measured (form ``issue``), and the data say which one moves
toward retraining. Any solver's IHVP drives the update; the damping is the weight decay λ (H's true L2 term)
unless the LDS-chosen damping differs, which is measured too.

Metrics (each against the model retrained with the same seed): the parameter distance ratio
‖θ_new − θ_retrain‖ / ‖θ − θ_retrain‖ (1 = no better than not updating), test accuracy, agreement of test
predictions, Spearman of the margins on the ground truth's reported queries and of their *changes*
(θ_new − θ against θ_retrain − θ), and the accuracy on the forget set under its true labels. The noise floor
is retraining itself: the model retrained with another seed, measured the same way. Baselines: no update, and
fine-tuning θ for a few epochs on the modified training set.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import core
from ..core.stats import spearman_rows
from ..evaluate import engine, records
from ..evaluate.solver import Task
from ..groundtruth import mislabel as mislabel_mod
from ..groundtruth import retrain
from ..setup import settings as settings_mod
from ..setup.store import ResultsStore
from . import counterfactual, qualitative

SIZES = (0.001, 0.005, 0.01, 0.05)  # forget-set sizes, as fractions of the training set
RULES = ("random", "self-influence", "flipped", "repair")
RANDOM_SEED = 0
FINETUNE_EPOCHS = 2
FINETUNE_LR = 0.1  # fine-tuning's learning rate, as a fraction of the recipe's (linear decay to 0, like training)
FORMS = ("derived", "issue")


def paths(store: ResultsStore, setting_name: str) -> dict[str, Path]:
    stem = store.unlearning / f"{setting_name}_unlearning"
    return {"rows": stem.with_suffix(".csv"), "summary": Path(f"{stem}_summary.csv"), "meta": stem.with_suffix(".json")}


# ---------------------------------------------------------------- the Newton steps

def gradient_sum(fm: core.FunctionalModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return core.loss_gradient_sum(fm, x, y) if len(y) else torch.zeros(fm.numel, dtype=fm.dtype, device=fm.device)


def removal_step(solver, x: torch.Tensor, y: torch.Tensor, n: int, mean_grad: torch.Tensor,
                 form: str = "derived") -> torch.Tensor:
    """(P,) Newton step that removes the points (x, y) from a training set of n (flat, over the solver's
    attributed parameters). ``derived``: 1/(n−m) H⁻¹ Σ (∇L(z) − ḡ), the step toward retraining on the mean of the
    rest; ``issue``: (1/n) H⁻¹ Σ ∇L(z). ``mean_grad`` is ḡ, the mean loss gradient over all n at θ."""
    fm = solver.functional(torch.float64)
    m = len(y)
    if form == "derived":
        v = (gradient_sum(fm, x, y) - m * mean_grad) / (n - m)
    elif form == "issue":
        v = gradient_sum(fm, x, y) / n
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return solver.ihvp(v[None])[0].double()


def repair_step(solver, x: torch.Tensor, y_old: torch.Tensor, y_new: torch.Tensor, n: int,
                form: str = "derived") -> torch.Tensor:
    """(P,) Newton step that gives the points x the labels ``y_new`` instead of ``y_old`` in a training set of n:
    ``derived`` −(1/n) H⁻¹ Σ (∇L(z̃) − ∇L(z)); ``issue`` the same with +."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    fm = solver.functional(torch.float64)
    v = (gradient_sum(fm, x, y_new) - gradient_sum(fm, x, y_old)) / n
    return (-1.0 if form == "derived" else 1.0) * solver.ihvp(v[None])[0].double()


def updated(model: torch.nn.Module, names: list[str], step: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` with ``step`` (flat over the parameters ``names``, in model order) added."""
    import copy

    new = copy.deepcopy(model)
    layout = core.ParamLayout.of(new, names)
    parts = layout.unflatten(step)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in parts:
                p.add_(parts[name].to(p.dtype))
    return new


def from_flat(setting: settings_mod.Setting, flat: np.ndarray) -> torch.nn.Module:
    model = setting.model(0)
    parts = core.ParamLayout.of(model).unflatten(torch.from_numpy(np.asarray(flat)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(parts[name])
    return model.eval()


def distance_ratio(candidate: np.ndarray, start: np.ndarray, retrained: np.ndarray) -> float:
    """‖θ_candidate − θ_retrain‖ / ‖θ − θ_retrain‖: 0 = retraining reached, 1 = no better than not updating."""
    c, s, r = (np.asarray(a, dtype=np.float64) for a in (candidate, start, retrained))
    return float(np.linalg.norm(c - r) / np.linalg.norm(s - r))


# ---------------------------------------------------------------- forget sets

def counts(n: int, sizes: tuple[float, ...]) -> list[int]:
    """Forget-set sizes in points (at least one) for fractions of a training set of n."""
    if any(not 0 < f < 1 for f in sizes):
        raise ValueError(f"forget-set sizes are fractions of the training set in (0, 1), got {list(sizes)}")
    return sorted({max(1, int(round(f * n))) for f in sizes})


def self_influence_tag(ranking: str, m: int) -> str:
    return f"self-influence|{ranking}|m={m}"


def forget_sets(n: int, flipped: np.ndarray, true_labels: np.ndarray, self_scores: np.ndarray | None,
                ranking: str, sizes: tuple[float, ...]) -> dict[str, tuple[dict, retrain.Experiment]]:
    """{tag: (description, experiment)} for every rule and size (self-influence only with ``self_scores``). Sets
    grow nested with the size (the first m of one seeded permutation, or of the ranking); the flipped rules add
    'all flipped points'."""
    out = {}
    perm = np.random.default_rng(RANDOM_SEED).permutation(n)
    fperm = np.asarray(flipped)[np.random.default_rng(RANDOM_SEED).permutation(len(flipped))]
    sizes_m = counts(n, sizes)
    for m in sizes_m:
        out[f"random|m={m}"] = ({"rule": "random", "size": m}, retrain.Experiment("remove", perm[:m]))
        if self_scores is not None:
            top = np.argsort(-self_scores, kind="stable")[:m]
            out[self_influence_tag(ranking, m)] = ({"rule": "self-influence", "size": m},
                                                   retrain.Experiment("remove", top))
    for m in [c for c in sizes_m if c < len(flipped)] + [len(flipped)]:
        idx = fperm[:m]
        out[f"flipped|m={m}"] = ({"rule": "flipped", "size": m}, retrain.Experiment("remove", idx))
        out[f"repair|m={m}"] = ({"rule": "repair", "size": m}, retrain.Experiment("relabel", idx, true_labels[idx]))
    return out


# ---------------------------------------------------------------- the study

@torch.no_grad()
def outputs(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, evaluation: np.ndarray,
            chunk: int = 4096) -> dict:
    """Predictions on the whole test set and margins at the evaluation points, from one pass."""
    model.eval()
    logits = torch.cat([model(test_x[i:i + chunk]).cpu() for i in range(0, len(test_x), chunk)])
    ev = torch.from_numpy(evaluation)
    return {"predictions": logits.argmax(-1).numpy(), "margins": core.margin(logits[ev], test_y[ev].cpu()).numpy()}


def _compare(cand: dict, retrained: dict, start: dict, test_y: np.ndarray) -> dict:
    """Agreement of a candidate's outputs with the retrained model's (same seed), and of its margin changes."""
    change = spearman_rows((cand["margins"] - start["margins"])[None], (retrained["margins"] - start["margins"])[None])
    return {"test_accuracy": float((cand["predictions"] == test_y).mean()),
            "agreement": float((cand["predictions"] == retrained["predictions"]).mean()),
            "margin_spearman": float(spearman_rows(cand["margins"][None], retrained["margins"][None])[0]),
            "change_spearman": float(change[0])}


def _methods(store, setting, methods: list, weight_decay: float) -> list[dict]:
    """The updates to measure: per solver its LDS-chosen parameters with damping = the weight decay as an absolute
    λ (both forms), and its LDS-chosen parameters as they are where those differ (derived form)."""
    out = []
    for cls in methods:
        params, source = records.chosen_params(store, setting, cls)
        if "damping" not in cls.defaults:
            out += [{"cls": cls, "params": params, "source": source, "form": f, "damping": None} for f in FORMS]
            continue
        wd = {**params, "damping": weight_decay}
        if "damping_mode" in cls.defaults:  # H = G + λI: the weight decay is an absolute λ, whatever LDS chose
            wd["damping_mode"] = "absolute"
        out += [{"cls": cls, "params": wd, "source": f"{source}; damping = weight decay", "form": f,
                 "damping": weight_decay} for f in FORMS]
        if params != wd:
            out.append({"cls": cls, "params": params, "source": source, "form": "derived",
                        "damping": params.get("damping")})
    return out


def run(store: ResultsStore, setting: settings_mod.Setting, methods: list, *, rank_by, sizes=SIZES, seeds: int = 2,
        executor=None, device=None, units_per_job: int = 1, max_units: int | None = None, progress: bool = True,
        log=print) -> dict:
    """Plan the forget sets, retrain what the artifact lacks, then measure every update on every seed whose
    retraining is done. Returns ``{"rows", "summary", "meta"}``; :func:`write` saves them."""
    from ..setup.training import default_device

    device = torch.device(device or default_device())
    mis = mislabel_mod.load(store, setting, records.MISLABEL_SPEC)
    gt = qualitative.explained(store, setting)
    data = setting.data()
    n = len(data.train_y)
    art = retrain.prepare(setting, retrain.mislabel_base(store, mis, seeds), gt.queries, store=store,
                          family=store.unlearning, predictions=True, parameters=True, log=log)
    tx = data.train_x.to(device)
    y_base = torch.from_numpy(art.train_labels).to(device)
    true = data.train_y.numpy()
    rank_params, rank_source = records.chosen_params(store, setting, rank_by)
    ranking = f"{rank_by.name}|{json.dumps(rank_params, sort_keys=True)}"
    plan = art.plan
    self_tags = {m: self_influence_tag(ranking, m) for m in counts(n, sizes)}
    scores, self_s = None, None
    if any(t not in plan for t in self_tags.values()):
        log(f"unlearning: {setting.name}: self-influence by {rank_by.name} {rank_params} ({rank_source}) on the "
            f"corrupted-label model, to rank forget sets")
        t0 = time.perf_counter()
        model0 = mis.model(0).to(device)
        engine.check_applicable(rank_by, model0, rank_params)
        ranker = rank_by(**rank_params).fit(Task(model0, tx, y_base, data.num_classes, "loss", device))
        scores = ranker.self_scores(tx, y_base).double().cpu().numpy()
        self_s = time.perf_counter() - t0
    sets = forget_sets(n, mis.flipped, true, scores, ranking, sizes)
    # what the plan already holds is what was trained (the ranking is not recomputed to find it again)
    sets.update({t: ({"rule": "self-influence", "size": m}, None) for m, t in self_tags.items() if t not in sets})
    order = sorted(sets, key=lambda t: (RULES.index(sets[t][0]["rule"]), sets[t][0]["size"]))
    sets = {t: (sets[t][0], art.experiment(plan[t]) if t in plan else sets[t][1]) for t in order}
    wanted = {t: e for t, (_, e) in sets.items() if t not in plan}
    t0 = time.perf_counter()
    art = retrain.build(art, wanted, store=store, executor=executor, device=str(device), units_per_job=units_per_job,
                        max_units=max_units, progress=progress, log=log)
    wall = time.perf_counter() - t0
    rows = measure(art, setting, sets, _methods(store, setting, methods, setting.recipe.weight_decay), device, log)
    meta = {"setting": setting.name, "explained": f"{store.relative(mis.root)}, corrupted-label model 0",
            "mislabel_root_hash": mis.root_hash(), "evaluation": f"{store.relative(gt.root)} reported queries",
            "seeds": art.seeds, "sizes": list(sizes), "ranking": {"solver": rank_by.name, "params": rank_params,
                                                                  "source": rank_source, "self_score_s": self_s},
            "finetune": {"epochs": FINETUNE_EPOCHS, "lr": FINETUNE_LR * setting.recipe.lr},
            "weight_decay": setting.recipe.weight_decay, "train_size": n,
            "artifact": {**art.reference(), "path": store.relative(art.root)}, "retrain_wall_s": wall,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return {"rows": rows, "summary": summarize(rows), "meta": meta}


def measure(art: retrain.Retrained, setting: settings_mod.Setting, sets: dict, updates: list[dict], device,
            log=print) -> pd.DataFrame:
    """Rows of metrics: per seed j with its reference done, per forget set retrained with seed j, per update."""
    from ..setup.training import train

    data = setting.data()
    n, ev = len(data.train_y), art.evaluation
    test_x, test_y = data.test_x.to(device), data.test_y
    ty = test_y.numpy()
    tx = data.train_x.to(device)
    y_base = torch.from_numpy(art.train_labels)
    true = data.train_y.numpy()
    plan, ref = art.plan, art.plan[retrain.REFERENCE]
    ft_recipe = dataclasses.replace(setting.recipe, epochs=FINETUNE_EPOCHS, lr=FINETUNE_LR * setting.recipe.lr)
    seeds = [j for j in range(len(art.seeds)) if art.done(ref, j)]
    retrained = {(t, j): art.unit(plan[t], j) for t in sets for j in seeds if t in plan and art.done(plan[t], j)}
    full = {j: art.unit(ref, j) for j in seeds}
    rows = []

    def forget_acc(model, exp) -> float:
        idx = torch.from_numpy(exp.indices)
        with torch.no_grad():
            pred = model.to(device)(tx[idx]).argmax(-1).cpu().numpy()
        return float((pred == true[exp.indices]).mean())

    for j in seeds:
        theta = full[j]["parameters"]
        start = from_flat(setting, theta).to(device)
        start_out = outputs(start, test_x, test_y, ev)
        todo = [(t, d, e) for t, (d, e) in sets.items() if (t, j) in retrained]
        if not todo:
            continue
        mean_grads, fitted = {}, {}
        cache = core.CurvatureCache()
        for upd in updates:
            key = (upd["cls"].name, json.dumps(upd["params"], sort_keys=True))
            if key not in fitted:
                t0 = time.perf_counter()
                engine.check_applicable(upd["cls"], start, upd["params"])
                solver = upd["cls"](**upd["params"]).fit(Task(start, tx, y_base.to(device), data.num_classes, "loss",
                                                              device, seed=j, cache=cache))
                names = tuple(solver.functional().layout.names)
                if names not in mean_grads:
                    mean_grads[names] = gradient_sum(solver.functional(torch.float64), tx, y_base) / n
                fitted[key] = (solver, time.perf_counter() - t0, names)
        log(f"unlearning: {setting.name} seed {j}: {len(todo)} forget sets x {len(updates)} updates")
        for t, desc, exp in todo:
            r = retrained[t, j]
            base = {**desc, "fraction": desc["size"] / n, "seed_index": j, "experiment": exp.id,
                    "retrain_s": float(r["seconds"]), "retrain_test_accuracy": float(r["test_accuracy"])}
            r_model = from_flat(setting, r["parameters"]).to(device)
            retrain_forget = forget_acc(r_model, exp)

            def row(method, form, damping, model, flat, **extra):
                out = outputs(model, test_x, test_y, ev)
                rows.append({**base, "method": method, "form": form, "damping": damping,
                             "distance_ratio": distance_ratio(flat, theta, r["parameters"]),
                             **_compare(out, r, start_out, ty), "forget_accuracy": forget_acc(model, exp),
                             "retrain_forget_accuracy": retrain_forget, **extra})

            row("no update", None, None, start, theta, update_s=0.0)
            idx = torch.from_numpy(exp.indices)
            for upd in updates:
                solver, fit_s, names = fitted[upd["cls"].name, json.dumps(upd["params"], sort_keys=True)]
                t0 = time.perf_counter()
                if exp.kind == "remove":
                    step = removal_step(solver, tx[idx], y_base[idx], n, mean_grads[names], upd["form"])
                else:
                    step = repair_step(solver, tx[idx], y_base[idx], torch.from_numpy(exp.labels), n, upd["form"])
                new = updated(start, list(names), step)
                update_s = time.perf_counter() - t0
                row(upd["cls"].name, upd["form"], upd["damping"], new, retrain.flat_parameters(new),
                    update_s=update_s, fit_s=fit_s, params=json.dumps(upd["params"], sort_keys=True))
            t0 = time.perf_counter()
            indices, y_mod = exp.training_set(y_base)
            tuned = train(from_flat(setting, theta), tx, y_mod.to(device), ft_recipe, art.seeds[j], indices)
            row("fine-tune", None, None, tuned, retrain.flat_parameters(tuned), update_s=time.perf_counter() - t0)
            for k in seeds:  # the noise floor: the same forget set retrained with another seed
                if k == j or (t, k) not in retrained:
                    continue
                other = retrained[t, k]
                cmp = _compare({"predictions": other["predictions"], "margins": other["margins"]}, r, start_out, ty)
                # its margin change is against its own full-data model, the seed-matched change of seed k
                cmp["change_spearman"] = float(spearman_rows((other["margins"] - full[k]["margins"])[None],
                                                             (r["margins"] - full[j]["margins"])[None])[0])
                rows.append({**base, "method": "retrain (other seed)", "form": None, "damping": None,
                             "other_seed_index": k,
                             "distance_ratio": distance_ratio(other["parameters"], theta, r["parameters"]), **cmp,
                             "forget_accuracy": forget_acc(from_flat(setting, other["parameters"]), exp),
                             "retrain_forget_accuracy": retrain_forget, "update_s": float(other["seconds"])})
    return pd.DataFrame(rows)


SUMMARY_KEYS = ["rule", "size", "fraction", "method", "form", "damping"]
METRICS = ["distance_ratio", "test_accuracy", "agreement", "margin_spearman", "change_spearman", "forget_accuracy",
           "retrain_test_accuracy", "retrain_forget_accuracy", "update_s", "fit_s", "retrain_s"]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds (and over the other seeds, for the noise floor) per rule, size, method, form, damping."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_KEYS + ["seeds"] + METRICS)
    keyed = rows.assign(**{k: rows[k].astype(object).where(rows[k].notna(), "") for k in ("form", "damping")})
    metrics = [m for m in METRICS if m in rows]
    out = keyed.groupby(SUMMARY_KEYS, sort=False).agg(seeds=("seed_index", "nunique"),
                                                       **{m: (m, "mean") for m in metrics}).reset_index()
    return out


def write(store: ResultsStore, result: dict) -> dict[str, Path]:
    return counterfactual.save(store, paths(store, result["meta"]["setting"]), result)
