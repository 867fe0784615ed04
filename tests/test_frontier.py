"""The cost–quality frontier (benchmark/studies/frontier.py) on the small synthetic ground truth with the toy solver
file: averaged cached units are the engine's ensembles, an interrupted run resumes without recomputing, a changed
zoo model or ground truth makes the file read as not current, and the saturating curves recover what simulated
them."""

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import synthetic_store, write_solver
from scipy.stats import spearmanr

from benchmark.evaluate import Task, engine, records, registry
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.groundtruth import index
from benchmark.groundtruth import zoo as zoo_mod
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, file_hashes, read_json, write_json
from benchmark.studies import frontier

S = settings.get("synthetic-mlp")
QUIET = dict(device="cpu", log=lambda *a: None)
TOY = "toy-exact"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "solvers"
    path = write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    return path


@pytest.fixture
def store(tmp_path):
    return synthetic_store(tmp_path)


def _ready(store, models=4):
    """A zoo of ``models`` models and the toy solver's single-model record explaining zoo model 0 (its damping chosen
    on validation queries, as the frontier requires)."""
    zoo_mod.build(S, zoo_mod.ZooSpec(models=models), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    cls = registry.get(TOY)
    rec = records.run(store, S, cls, tasks=["lds"], explain="zoo", **QUIET)
    assert rec["lds"]["selection"]["searched"]
    return cls, rec["lds"]["params"]


def _cfg(**kw):
    base = dict(families=(frontier.Family(TOY), frontier.Family(TOY, "ckpt")), members=(1, 2, 4), checkpoints=(1, 2),
                reference=TOY, progress=False, bootstrap=50, device="cpu", log=lambda *a: None)
    return frontier.FrontierConfig(**{**base, **kw})


def test_family_names_and_checkpoints():
    assert frontier.Family.parse("ekfac") == frontier.Family("ekfac")
    assert frontier.Family.parse("ekfac:ckpt+zoo").name == "ekfac:ckpt+zoo"
    f = frontier.Family.parse("arnoldi:rank=512,1024")
    assert (f.kind, f.knob, f.values) == ("knob", "rank", (512, 1024))
    assert frontier.Family.parse("datainf:damping=1e-6").values == (1e-6,)
    with pytest.raises(ValueError, match="KNOB=v1"):
        frontier.Family.parse("trak:proj")
    assert frontier.checkpoint_epochs(8, 1) == [8] and frontier.checkpoint_epochs(8, 4) == [2, 4, 6, 8]
    assert frontier.checkpoint_epochs(20, 8) == [3, 5, 8, 10, 13, 15, 18, 20]
    with pytest.raises(ValueError):
        frontier.checkpoint_epochs(3, 4)


def test_averaged_units_are_the_engines_ensembles(toy, store):
    cls, params = _ready(store)
    knob = frontier.Family.parse(f"{TOY}:damping=0.01,1.0")
    doc = frontier.run(store, S, {TOY: cls}, _cfg(families=_cfg().families + (knob,)))
    gt, zoo, data = gt_artifact.load(store, S), zoo_mod.load(store, S), S.data()
    points = {(p["family"], p["members"]): p for p in doc["points"]}
    for n in (1, 2, 4):
        want = engine.evaluate_lds(gt, cls, params, search=False, explained=engine.Explained.from_zoo(zoo, n), **QUIET)
        got = points[(TOY, n)]
        assert got["lds"]["mean"] == pytest.approx(want["mean"], abs=1e-9)
        assert got["per_query"] == pytest.approx(want["per_query"], abs=2e-6)
        # compute: the members' fit + score, and the training of every zoo model beyond model 0
        seconds = {m["k"]: m["seconds"] for m in zoo.manifest["models"]}
        assert got["cost"]["training_s"] == pytest.approx(sum(seconds[k] for k in range(1, n)))
        assert got["compute_s"] == pytest.approx(sum(got["cost"].values()))
        assert got["trained_models"] == n
    # a knob point: zoo model 0 alone at that value, the other parameters the record's
    for v in (0.01, 1.0):
        want = engine.evaluate_lds(gt, cls, {**params, "damping": v}, search=False,
                                   explained=engine.Explained.from_zoo(zoo, 1), **QUIET)
        got = next(p for p in doc["points"] if p["family"] == knob.name and p["params"]["damping"] == v)
        assert got["per_query"] == pytest.approx(want["per_query"], abs=2e-6) and got["trained_models"] == 1
    assert knob.name not in doc["fits"]
    assert points[(TOY, 1)]["paired"]["difference"] == 0.0  # the reference itself
    d = points[(TOY, 4)]["paired"]
    diff = np.array(points[(TOY, 4)]["per_query"]) - np.array(points[(TOY, 1)]["per_query"])
    assert d["difference"] == pytest.approx(diff.mean(), abs=1e-12) and d["wins"] == pytest.approx((diff > 0).mean())

    # a checkpoint ensemble is the mean of each checkpoint's scores, fitted by hand (scipy's Spearman)
    q = torch.from_numpy(gt.queries)
    epochs = frontier.checkpoint_epochs(zoo.epochs, 2)
    scores = sum(cls(**params).fit(Task(zoo.checkpoint(0, e), data.train_x, data.train_y, data.num_classes))
                 .scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double().numpy()
                 for e in epochs) / len(epochs)
    target = gt.target("margin", "queries")
    expect = [spearmanr(gt.masks.astype(float) @ scores[i], target[:, i]).statistic for i in range(len(q))]
    ckpt = points[(f"{TOY}:ckpt", 2)]
    assert ckpt["per_query"] == pytest.approx(expect, abs=1e-6) and ckpt["trained_models"] == 1
    assert ckpt["cost"]["training_s"] == 0 and ckpt["units"] == [[0, e] for e in epochs]


def test_an_interrupted_run_resumes_and_computes_nothing_twice(toy, store, monkeypatch):
    cls, _ = _ready(store)
    real, done = frontier.compute_unit, []

    def counting(ctx, m, cache):
        if len(done) == 3 and not getattr(counting, "resumed", False):
            raise KeyboardInterrupt  # the fourth unit never finishes
        done.append(m)
        return real(ctx, m, cache)

    monkeypatch.setattr(frontier, "compute_unit", counting)
    with pytest.raises(KeyboardInterrupt):
        frontier.run(store, S, {TOY: cls}, _cfg())
    assert len(done) == 3 and not frontier.frontier_path(store, S).exists()
    counting.resumed = True
    first = frontier.run(store, S, {TOY: cls}, _cfg())
    # toy-exact 4 models + checkpoints {mid, final} of model 0: 5 distinct units, each computed exactly once
    assert len(done) == len(set(done)) == 5
    again = frontier.run(store, S, {TOY: cls}, _cfg())
    assert len(done) == 5  # everything cached
    assert [p["per_query"] for p in again["points"]] == [p["per_query"] for p in first["points"]]


def test_the_file_checks_itself_and_says_when_it_is_no_longer_current(toy, store, monkeypatch):
    cls, _ = _ready(store)
    frontier.run(store, S, {TOY: cls}, _cfg(members=(1, 2)))
    doc = frontier.read(store, S)
    assert frontier.stale_reasons(doc, store, S, {TOY: cls}) == []

    path = frontier.frontier_path(store, S)
    edited = json.loads(path.read_text())
    edited["points"][0]["lds"]["mean"] += 0.01
    path.write_text(json.dumps(edited))
    with pytest.raises(frontier.FrontierError, match="content"):
        frontier.read(store, S)
    frontier.write(path, doc)

    # a zoo model it explained changed (file and hash rewritten together): not current
    zoo = zoo_mod.load(store, S)
    victim = zoo.root / "k01" / f"epoch_{zoo.epochs:02d}.safetensors"
    original = victim.read_bytes()
    man = read_json(zoo.root / MANIFEST)
    victim.write_bytes(original[:-8] + b"\0" * 8)
    man["files"].update(file_hashes(zoo.root, [str(victim.relative_to(zoo.root))]))
    write_json(zoo.root / MANIFEST, man)
    index.pin(store, zoo.root, index.root_hash(man), "model zoo")
    assert any("zoo models it explained changed" in w for w in frontier.stale_reasons(doc, store, S))
    # the unit cache knows it too: that model's unit alone is recomputed, the others are reused
    real, done = frontier.compute_unit, []
    monkeypatch.setattr(frontier, "compute_unit", lambda ctx, m, cache: done.append(m) or real(ctx, m, cache))
    doc = frontier.run(store, S, {TOY: cls}, _cfg(members=(1, 2)))
    assert [(m.k, m.epoch) for m in done] == [(1, zoo.epochs)]
    assert frontier.stale_reasons(doc, store, S) == []

    # the ground truth's files changed (rewritten with their hashes and re-pinned)
    src = gt_artifact.latest(store.gt, S)
    gman = read_json(src / MANIFEST)
    unit = src / "units" / "r00_s0000.npz"
    with np.load(unit) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["outputs"][0] *= -1
    np.savez(unit, **arrays)
    gman["files"].update(file_hashes(src, ["units/r00_s0000.npz"]))
    write_json(src / MANIFEST, gman)
    index.pin(store, src, index.root_hash(gman), "ground truth")
    assert any("ground-truth files changed" in w for w in frontier.stale_reasons(doc, store, S))


def _simulated(curve, params, ns=(1, 2, 4, 8, 16, 32), queries=3000, noise=0.1, seed=1):
    """Per-query values whose means follow ``curve``: each query has its own offset (shared by every point, as a
    query's difficulty is) plus independent noise per point."""
    f, keys = frontier.CURVES[curve]
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 0.15, queries)
    out = []
    for n in ns:
        pq = f(float(n), *[params[k] for k in keys]) + offset - offset.mean() + rng.normal(0, noise / 10, queries)
        out.append({"members": n, "per_query": list(pq), "compute_s": 10.0 * n + 5.0})
    return out


# ceilings whose 0.8 lies between the 32-member point and the asymptote: that target is extrapolated
@pytest.mark.parametrize("curve,params,ceiling", [("power", {"a": 0.62, "b": 0.36, "c": 0.7}, 0.75),
                                                  ("reliability", {"a": 0.70, "r": 0.35}, 0.8625)])
def test_the_curve_fit_recovers_a_simulated_curve(curve, params, ceiling):
    fit = frontier.fit_family(_simulated(curve, params), ceiling=ceiling, n_boot=100)
    assert fit["fitted"] and fit["curve"] == curve
    for k, v in params.items():
        assert fit["fits"][curve]["params"][k] == pytest.approx(v, abs=0.02)
    lo, hi = fit["asymptote_ci"]
    assert lo <= params["a"] <= hi or abs(fit["asymptote"] - params["a"]) < 0.01
    # the members needed: the true curve, evaluated there, is at the target; compute follows the linear cost
    f, keys = frontier.CURVES[curve]
    far = fit["extrapolation"][f"of_ceiling_{frontier.TARGET_OF_CEILING}"]
    assert far["note"] == "extrapolated" and far["members"] > 32 and far["members_ci"][0] <= far["members"]
    for e in fit["extrapolation"].values():
        assert e["reachable"]
        if e["note"] == "reached by the measured points":
            continue
        true_n = frontier.members_needed(curve, params, e["target"])
        assert e["members"] == pytest.approx(true_n, rel=0.1)
        assert f(e["members"], *[fit["fits"][curve]["params"][k] for k in keys]) == pytest.approx(e["target"],
                                                                                                   abs=1e-9)
        assert e["compute_s"] == pytest.approx(5.0 + 10.0 * e["members"])


def test_a_target_above_the_asymptote_is_not_reachable():
    fit = frontier.fit_family(_simulated("power", {"a": 0.45, "b": 0.3, "c": 0.8}), ceiling=0.55, n_boot=100)
    lds = fit["extrapolation"]["lds_0.50"]
    assert not lds["reachable"] and lds["members"] is None and lds["compute_s"] is None
    assert lds["note"].startswith("not reachable") and lds["unreachable_share"] == 1.0
    ceil = fit["extrapolation"]["of_ceiling_0.8"]  # 0.44 < 0.45: reachable, far out
    assert ceil["reachable"] and ceil["members"] > 32
    assert frontier.members_needed("reliability", {"a": 0.4, "r": 0.2}, 0.5) == math.inf
    assert frontier.members_needed("power", {"a": 0.6, "b": 0.1, "c": 1.0}, 0.5) == 1.0  # one member already does
    # a target the measured points reach is read off them (the first point reaching it), not off the curve
    pts = _simulated("power", {"a": 0.62, "b": 0.36, "c": 0.7})
    fit = frontier.fit_family(pts, ceiling=0.7, n_boot=20)
    first = next(p for p in pts if np.mean(p["per_query"]) >= 0.5)
    got = fit["extrapolation"]["lds_0.50"]
    assert got["members"] == first["members"] and got["compute_s"] == first["compute_s"]
    assert got["note"] == "reached by the measured points"
