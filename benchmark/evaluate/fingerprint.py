"""Floor 4: behavioural fingerprints — what the code that produced a number *computes*, recorded with the number.

A run record is current only while the code behind it still computes the same thing. Hashing source files
would stale every record whenever a file moves, and misses the code a file calls. Instead a record carries:

- a **solver probe**: the scores and self-influence scores (where the solver has them) of the solver, with the
  record's parameters, on a fixed tiny problem (a small CNN trained by a few epochs of SGD on seeded data, with
  its trajectory, no files): 4 × 48 scores and 48 self-scores;
- a **metric probe**: LDS, its uncertainty, mislabel recall, AUC and the noise ceiling on fixed inputs;
- the **target** it was scored against (a hash of the target arrays the ground truth yields now).

Each is recomputed in a second or so; a record whose probes differ beyond float tolerance is stale. Moving or
refactoring code that computes the same numbers keeps every record.

Round-off differs between machines (CPU model, thread count), and a probe amplifies it by its own conditioning:
TRAK's probe kernel (k = P = 357 > N = 48 training points: rank 48, its null space held up only by its ridge,
which the float32 round-off of the kernel's null eigenvalues is 1% of) leaks the 60% of each query feature outside
the training features' span into its query scores: they move 0.5-1%, where every other probe moves 1e-7 to 1e-4
(TRAK on real data, k < N, has no null space). So a solver
probe that differs beyond :data:`SOLVER_RTOL` is measured once more (:func:`solver_tolerance`): rerun with its
inputs nudged by one unit in the last place, it may differ by :data:`SENSITIVITY_MARGIN` times its largest move,
key by key, and no more; never by more than :data:`SOLVER_RTOL_CAP` (beyond, the strict tolerance stays, and the
reason says the probe cannot tell round-off from a change).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math

import numpy as np
import torch
from torch import nn

from ..core.stats import noise_ceiling
from ..setup.config import TrainRecipe
from . import metrics

FINGERPRINT_VERSION = 2  # 2: the probe model is trained by the recipe's SGD and carries its trajectory
SOLVER_RTOL = 1e-4  # the strict tolerance: well-conditioned probes move 1e-7 to 1e-4 between machines
METRIC_RTOL = 1e-9
PROBE_SHAPE = {"classes": 3, "side": 8, "train": 48, "queries": 4, "epochs": 4}
# A probe beyond SOLVER_RTOL is rerun PERTURBATIONS times with nudged inputs; it may differ from the record by
# SENSITIVITY_MARGIN times its largest move (machines and thread counts move it less than one nudge does).
PERTURBATIONS = 3
SENSITIVITY_MARGIN = 3.0
# Never wider: a probe that round-off moves further cannot tell a change of code from another machine, so its
# records stay strict there (stale, with the reason) rather than unable to go stale at all.
SOLVER_RTOL_CAP = 0.05


def _nudge(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every entry one unit in the last place up or down, at random: the smallest change round-off makes."""
    up = torch.rand(t.shape, generator=gen) < 0.5
    return torch.nextafter(t, torch.where(up, math.inf, -math.inf).to(t.dtype))


def _probe_problem(perturbation: int | None = None):
    """A small CNN trained for a few epochs of minibatch SGD on seeded data (deterministic on one thread), with its
    training trajectory, so solvers that attribute through training are probed too. ``perturbation`` (0, 1, ...)
    nudges the data and the initial weights by one unit in the last place (labels unchanged) before training."""
    from .solver import record_trajectory

    c, side, n, q = (PROBE_SHAPE[k] for k in ("classes", "side", "train", "queries"))
    gen = torch.Generator().manual_seed(20261130)
    x = torch.randn(n + q, 1, side, side, generator=gen)
    teacher = torch.randn(side * side, c, generator=gen)
    y = (x.flatten(1) @ teacher + 0.5 * torch.randn(n + q, c, generator=gen)).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * (side - 2) ** 2, c))
    if perturbation is not None:
        nudge = torch.Generator().manual_seed(1_000 + perturbation)
        x = _nudge(x, nudge)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(_nudge(p, nudge))
    recipe = TrainRecipe(epochs=PROBE_SHAPE["epochs"], batch_size=12, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, trajectory = record_trajectory(model, x[:n], y[:n], recipe, seed=7)
    return model.eval(), x[:n], y[:n], x[n:], y[n:], c, trajectory


def _round(values, digits: int = 8) -> list[float]:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return [float(f"{v:.{digits}g}") for v in arr]


def solver_probe(cls, params: dict, perturbation: int | None = None) -> dict:
    """Scores and self-scores of ``cls(**cls.probe_params(params))`` on the probe problem (or the error it raises
    there); ``perturbation``: on its nudged variant (:func:`_probe_problem`)."""
    from .solver import Task

    import os

    before, bars = torch.get_num_threads(), os.environ.get("TDABENCH_PROGRESS")
    torch.set_num_threads(1)
    os.environ["TDABENCH_PROGRESS"] = "0"  # a probe takes seconds: no progress bars
    try:
        model, tx, ty, qx, qy, classes, trajectory = _probe_problem(perturbation)
        solver = cls(**cls.probe_params(params)).fit(Task(model, tx, ty, classes, "margin", seed=0,
                                                          trajectory=trajectory))
        probe = {"scores": _round(solver.scores(qx, qy, tx, ty))}
        if cls.has_self_influence:
            probe["self_scores"] = _round(solver.self_scores(tx, ty))
        return probe
    except Exception as exc:  # noqa: BLE001 - a solver that cannot run on the probe is fingerprinted by its error
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    finally:
        torch.set_num_threads(before)
        if bars is None:
            os.environ.pop("TDABENCH_PROGRESS", None)
        else:
            os.environ["TDABENCH_PROGRESS"] = bars


@functools.lru_cache(maxsize=1)
def metric_probe() -> dict:
    """The metrics on fixed inputs: LDS (per query and summarised), mislabel recall and AUC, noise ceiling."""
    rng = np.random.default_rng(11)
    masks = rng.random((12, 40)) < 0.5
    scores = rng.normal(size=(6, 40))
    target = masks @ scores.T + rng.normal(size=(12, 6))
    lds = metrics.lds(scores, masks, target, ceiling=0.8)
    flipped = np.sort(rng.choice(60, 6, replace=False))
    mis = metrics.mislabel(rng.normal(size=60) + np.isin(np.arange(60), flipped), flipped)
    ceiling = noise_ceiling(target[None] + rng.normal(size=(4, 12, 6)))
    return {"lds_per_query": _round(lds["per_query"]),
            "lds": _round([lds[k] for k in ("mean", "se", "ci_low", "ci_high", "of_ceiling")]),
            "mislabel": _round([mis[k] for k in ("recall_10", "recall_30", "recall_50", "auc", "auc_se",
                                                 "recall_curve_area")]),
            "ceiling": _round([ceiling[k] for k in ("lds_ceiling", "lds_ceiling_se", "pairwise_single_seed",
                                                    "reliability")])}


def target_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _relative_move(a, b) -> float:
    """Largest difference of two probe values, relative to the largest magnitude of ``a``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf
    return float(np.abs(a - b).max(initial=0.0)) / max(float(np.abs(a).max(initial=0.0)), 1e-300)


@functools.lru_cache(maxsize=256)
def cached_probe(cls, params_json: str) -> dict:
    """:func:`solver_probe` of ``cls`` with its parameters as sorted JSON, once per process: a record's check and
    the tolerance measured after a strict failure share it."""
    return solver_probe(cls, json.loads(params_json))


@functools.lru_cache(maxsize=256)
def _probe_moves(cls, params_json: str) -> tuple[tuple[str, float], ...]:
    params = json.loads(params_json)
    base = cached_probe(cls, params_json)
    if "error" in base:
        return ()
    moves = {key: 0.0 for key in base}
    for i in range(PERTURBATIONS):
        nudged = solver_probe(cls, params, perturbation=i)
        if "error" in nudged:  # fails on nudged inputs: no tolerance learnt from it (a knife edge stays strict)
            continue
        for key in base:
            moves[key] = max(moves[key], _relative_move(base[key], nudged.get(key, [])))
    return tuple(sorted(moves.items()))


def solver_tolerance(cls, params: dict) -> dict[str, float]:
    """Relative tolerance per probe key of ``cls(**params)``: :data:`SENSITIVITY_MARGIN` times the largest move of
    that key over :data:`PERTURBATIONS` runs with nudged inputs, at least :data:`SOLVER_RTOL`; a key that would need
    more than :data:`SOLVER_RTOL_CAP` stays at :data:`SOLVER_RTOL`. Seconds; cached."""
    moves = dict(_probe_moves(cls, json.dumps(params, sort_keys=True)))
    return {key: max(SOLVER_RTOL, SENSITIVITY_MARGIN * move) if SENSITIVITY_MARGIN * move <= SOLVER_RTOL_CAP
            else SOLVER_RTOL for key, move in moves.items()}


def compare_solver(recorded: dict | None, now: dict, cls, params: dict) -> str | None:
    """:func:`compare` for solver probes: strict first (fast); past :data:`SOLVER_RTOL`, against the probe's own
    sensitivity to round-off (:func:`solver_tolerance`), so another machine's round-off is not a code change."""
    diff = compare(recorded, now, SOLVER_RTOL)
    if diff is None or not recorded or "error" in recorded or "error" in now:
        return diff
    diff = compare(recorded, now, solver_tolerance(cls, params))
    moves = dict(_probe_moves(cls, json.dumps(params, sort_keys=True)))
    wild = {k: m for k, m in moves.items() if SENSITIVITY_MARGIN * m > SOLVER_RTOL_CAP}
    if diff and wild:
        diff += ("; its probe is too ill-conditioned to tell round-off from a change (" +
                 ", ".join(f"{k} move by {m:.2g} when its inputs are nudged by one unit in the last place"
                           for k, m in sorted(wild.items())) + ")")
    return diff


def compare(recorded: dict | None, now: dict, rtol: float | dict[str, float]) -> str | None:
    """None when two probes agree; else what differs. ``rtol``: one relative tolerance, or one per key (from
    :func:`solver_tolerance`; :data:`SOLVER_RTOL` for a key it lacks)."""
    if not recorded:
        return "it records no fingerprint"
    if ("error" in recorded) != ("error" in now):
        return f"probe {'fails' if 'error' in now else 'runs'} now ({now.get('error', 'no error')}) but " \
               f"{'failed' if 'error' in recorded else 'ran'} then"
    if "error" in recorded:
        return None if recorded["error"] == now["error"] else f"probe error changed: {now['error']}"
    for key in sorted(set(recorded) | set(now)):
        a, b = np.asarray(recorded.get(key, []), float), np.asarray(now.get(key, []), float)
        if a.shape != b.shape:
            return f"{key}: {a.shape} values then, {b.shape} now"
        err = _relative_move(a, b)
        tol = rtol.get(key, SOLVER_RTOL) if isinstance(rtol, dict) else rtol
        if not err <= tol:
            how = (f"{SENSITIVITY_MARGIN:g} × its move under round-off-level nudges of the probe's inputs"
                   if isinstance(rtol, dict) and tol > SOLVER_RTOL else "")
            return f"{key} differ by {err:.2g} (relative; tolerance {tol:.2g}{'; ' + how if how else ''})"
    return None
