"""TRAK, TracIn, Arnoldi and DataInf against their definitions written out independently on tiny float64 models,
K-FAC/EK-FAC's relative damping, and each new solver end to end on the synthetic ground truth.

Tolerances: every comparison here is between two float64 computations of the same formula (or of the exact damped
inverse), so 1e-8 relative, except TRAK, whose projection R is drawn in float32 and whose kernel inverse is
ill-conditioned by a square Gaussian R (condition number ~ P): 1e-6.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from eval_helpers import synthetic_store
from test_solvers import data, dense_reference, loop_grads, problem, query_grads, rel_err, tiny_mlp
from torch import nn

from benchmark import core as cv
from benchmark.evaluate import SolverError, Task, Trajectory, records, registry
from benchmark.groundtruth import zoo as zoo_mod
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.setup import settings
from benchmark.setup.config import TrainRecipe
from benchmark.setup.training import train

TIGHT = dict(rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- arnoldi

def test_arnoldi_with_every_eigenvector_is_the_exact_damped_inverse():
    """r = P Lanczos vectors span the whole space (restarting where G's Krylov space ends: G is singular), so the
    Ritz values are G's eigenvalues and the subspace inverse is (G + λI)⁻¹."""
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    P = sum(p.numel() for p in task.model.parameters())
    G = cv.dense_ggn(cv.FunctionalModel(task.model, torch.float64), task.train_x)
    for damping in (1e-3, 1.0):
        s = registry.get("arnoldi")(rank=P, iterations=P, damping=damping).fit(task)
        assert rel_err(s.ihvp(V), dense_reference(task, damping, V)) < 1e-10
    want = torch.linalg.eigvalsh(G).flip(0)
    torch.testing.assert_close(s.spectrum["eigenvalues"], want, rtol=0, atol=1e-12 * float(want[0]))
    assert s.info()["restarts"] >= 1  # the null space of G needed fresh directions


def test_arnoldi_error_falls_as_the_rank_grows_and_the_top_eigenvalues_come_first():
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    ref = dense_reference(task, 0.1, V)
    ranks = [2, 8, 32, 64, 96]
    errs = [rel_err(registry.get("arnoldi")(rank=r, iterations=106, damping=0.1).fit(task).ihvp(V), ref)
            for r in ranks]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.9 and errs[-1] < 0.1, errs
    # fewer iterations than P: the top Ritz values already match G's top eigenvalues
    G = cv.dense_ggn(cv.FunctionalModel(task.model, torch.float64), task.train_x)
    top = torch.linalg.eigvalsh(G).flip(0)[:4]
    few = registry.get("arnoldi")(rank=4, iterations=40, damping=0.1).fit(task)
    torch.testing.assert_close(few.eigenvalues, top, rtol=1e-8, atol=0)


def test_arnoldi_is_deterministic_given_the_seed():
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    fresh = [dataclasses.replace(task, cache=cv.CurvatureCache()) for _ in range(2)]  # no shared Lanczos run
    a, b = (registry.get("arnoldi")(rank=8, iterations=20).fit(t).ihvp(V) for t in fresh)
    assert torch.equal(a, b)
    other = registry.get("arnoldi")(rank=8, iterations=20).fit(dataclasses.replace(task, seed=4,
                                                                                   cache=cv.CurvatureCache()))
    assert not torch.allclose(other.ihvp(V), a)  # another start vector, another 20-step Krylov space
    with pytest.raises(SolverError, match="rank 30 exceeds the 20 Lanczos iterations"):
        registry.get("arnoldi")(rank=30, iterations=20).fit(task)


def test_arnoldi_on_a_subset_is_the_exact_inverse_of_that_subsets_G_and_float32_products_stay_close():
    """ggn_samples = m: G is the mean over m training examples drawn by the task's seed — with every eigenvector,
    the exact damped inverse of *that* G (dense, from the same rows), not of the full G. float32 products keep the
    float64 recurrence within float32 round-off of the float64 products."""
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    P = sum(p.numel() for p in task.model.parameters())
    m = len(task.train_y) // 3
    s = registry.get("arnoldi")(rank=P, iterations=P, damping=0.1, ggn_samples=m).fit(task)
    rows = torch.randperm(len(task.train_y), generator=torch.Generator().manual_seed(task.seed))[:m].sort().values
    G_sub = cv.dense_ggn(cv.FunctionalModel(task.model, torch.float64), task.train_x[rows])
    want = torch.linalg.solve(G_sub + 0.1 * torch.eye(P, dtype=torch.float64), V.double().T).T
    assert rel_err(s.ihvp(V), want) < 1e-9
    assert rel_err(s.ihvp(V), dense_reference(task, 0.1, V)) > 1e-3  # the subset's G is another matrix
    full = registry.get("arnoldi")(rank=P, iterations=P, damping=0.1, ggn_samples=None).fit(task)
    assert rel_err(full.ihvp(V), dense_reference(task, 0.1, V)) < 1e-10
    f32 = registry.get("arnoldi")(rank=16, iterations=40, damping=0.1, precision="float32").fit(
        dataclasses.replace(task, cache=cv.CurvatureCache()))
    f64 = registry.get("arnoldi")(rank=16, iterations=40, damping=0.1).fit(task)
    torch.testing.assert_close(f32.eigenvalues, f64.eigenvalues, rtol=1e-5, atol=0)
    for bad, match in (({"ggn_samples": 0}, "ggn_samples must be"), ({"precision": "half"}, "precision must be")):
        with pytest.raises(SolverError, match=match):
            registry.get("arnoldi")(**bad).fit(task)


# ---------------------------------------------------------------- datainf

def test_datainf_equals_its_closed_form_written_independently():
    """Per parameter tensor l: λ_l = c · mean of g², and (1/N) Σᵢ (gᵢgᵢᵀ + λ_l I)⁻¹ v_l with each inverse formed
    densely (not by Sherman–Morrison), gradients from a plain autograd loop."""
    task, x, y = problem("mlp")
    V, qx, qy = query_grads(task)
    gt = loop_grads(task.model, x, y, "loss")
    c = 0.3
    want, start = torch.empty_like(V), 0
    for p in task.model.parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        g = gt[:, sl]
        lam = c * float((g ** 2).mean())
        eye = torch.eye(g.shape[1], dtype=g.dtype)
        inverse = sum(torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in g) / len(g)
        want[:, sl] = V[:, sl] @ inverse.T
    s = registry.get("datainf")(damping=c).fit(task)
    torch.testing.assert_close(s.ihvp(V), want, **TIGHT)
    torch.testing.assert_close(s.scores(qx, qy, x, y).double(), -(want @ gt.T), rtol=1e-6, atol=1e-8)
    with pytest.raises(SolverError, match="damping must be > 0"):
        registry.get("datainf")(damping=0.0).fit(task)


def test_datainf_is_exact_for_one_training_example():
    """With N = 1 the average of inverses is the inverse of the average: DataInf is the exact damped inverse of the
    (block-diagonal) empirical Fisher."""
    task, x, y = problem("mlp", n=1)
    V, _, _ = query_grads(task)
    g = loop_grads(task.model, x, y, "loss")[0]
    s = registry.get("datainf")(damping=0.5).fit(task)
    start = 0
    for name, p in task.model.named_parameters():
        sl = slice(start, start + p.numel())
        start += p.numel()
        F_l = torch.outer(g[sl], g[sl]) + s.lam[name] * torch.eye(p.numel(), dtype=g.dtype)
        torch.testing.assert_close(s.ihvp(V)[:, sl], torch.linalg.solve(F_l, V[:, sl].T).T, **TIGHT)


# ---------------------------------------------------------------- trak

def tanh_output_model(seed=0):
    """Squashed logits, so that no direction of θ shifts every logit alike: the margin gradients span all of θ
    and their second-moment matrix is invertible once N > P."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 3), nn.Tanh()).double().eval()


def test_trak_at_full_dimension_is_the_unprojected_kernel_whatever_the_seed():
    """k = P (proj_dim above P is capped), no reweighting, no ridge: R is square and invertible, so
    R(RᵀMR)⁻¹Rᵀ = M⁻¹ with M = (1/N) Σ ∇f∇fᵀ — the scores are ∇f(q)ᵀM⁻¹∇f(zᵢ), computed here densely without any
    projection, and the same for every projection seed."""
    model = tanh_output_model()
    x, y = data(60, (5,), classes=3)
    qx, qy = data(4, (5,), classes=3, seed=5)
    gf = loop_grads(model, x, y, "margin")
    M = gf.T @ gf / len(y)
    want = loop_grads(model, qx, qy, "margin") @ torch.linalg.solve(M, gf.T)
    for seed in (0, 1, 2):
        s = registry.get("trak")(proj_dim=1000, damping=0.0, reweight=False).fit(Task(model, x, y, 3, seed=seed))
        assert s.info()["proj_dim"] == 18
        torch.testing.assert_close(s.scores(qx, qy, x, y).double(), want.float().double(), rtol=1e-6, atol=1e-6)


def test_trak_equals_the_projected_kernel_formula_with_its_reweighting():
    """k < P with the 1 − p reweighting and the ridge, against the formula with R written out as a matrix:
    τ(q, i) = (1 − pᵢ) φ_qᵀ(ΦᵀΦ/N + λ̃I)⁻¹φᵢ, φ = Rᵀ∇f, λ̃ = damping · tr(ΦᵀΦ/N)/k."""
    task, x, y = problem("mlp")
    _, qx, qy = query_grads(task)
    k, damping = 40, 1e-2
    s = registry.get("trak")(proj_dim=k, damping=damping).fit(task)
    R = cv.RandomProjection(106, k, task.seed).matrix().double()
    phi = loop_grads(task.model, x, y, "margin") @ R
    K = phi.T @ phi / len(y)
    ridge = damping * float(K.trace()) / k
    p = torch.softmax(task.model(x), -1).gather(1, y[:, None]).squeeze(1).detach()
    want = (loop_grads(task.model, qx, qy, "margin") @ R) @ torch.linalg.solve(K + ridge * torch.eye(k, dtype=K.dtype),
                                                                              phi.T) * (1 - p)
    torch.testing.assert_close(s.scores(qx, qy, x, y).double(), want, rtol=1e-6, atol=1e-7)
    # an ensemble's models get different projections: another seed, other scores
    other = registry.get("trak")(proj_dim=k, damping=damping).fit(dataclasses.replace(task, seed=4))
    assert not torch.allclose(other.scores(qx, qy, x, y), s.scores(qx, qy, x, y), rtol=1e-3)
    with pytest.raises(SolverError, match="kernel .* is singular with damping=0"):
        registry.get("trak")(proj_dim=106, damping=0.0).fit(task)  # 48 examples cannot fill 106 dimensions


def test_random_projection_in_blocks_equals_the_matrix_and_keeps_norms():
    x = torch.randn(3, 3000, dtype=torch.float64)
    held = cv.RandomProjection(3000, 300, seed=7)
    streamed = cv.RandomProjection(3000, 300, seed=7, keep_mb=0)  # 3 blocks, regenerated at every product
    torch.testing.assert_close(streamed(x), x @ held.matrix().double(), rtol=0, atol=1e-12)
    assert streamed.nbytes == 0 and held.nbytes == 4 * 3000 * 300
    w = torch.randn(2, 300, dtype=torch.float64)
    torch.testing.assert_close(streamed.transpose(w), w @ held.matrix().double().T, rtol=0, atol=1e-12)
    R = cv.RandomProjection(50, 20000, seed=1).matrix().double()
    assert float((R @ R.T - torch.eye(50, dtype=R.dtype)).abs().max()) < 0.05  # E[RRᵀ] = I, within 4 s.d.
    assert not torch.equal(cv.RandomProjection(50, 30, seed=1).matrix(), cv.RandomProjection(50, 30, seed=2).matrix())


# ---------------------------------------------------------------- tracin

def trained_with_trajectory(epochs=2):
    """A tiny MLP trained for real by the project's trainer, with its per-epoch checkpoints and learning rates."""
    model = tiny_mlp()
    x, y = data(40, (1, 3, 4))
    states, rates = {}, []

    def on_epoch(epoch, m, schedule):
        states[epoch] = copy.deepcopy(m.state_dict())
        if epoch:
            rates.append(schedule)

    recipe = TrainRecipe(epochs=epochs, batch_size=16, lr=0.3, momentum=0.0, weight_decay=0.0)
    model = train(model, x, y, recipe, seed=3, on_epoch=on_epoch)

    def checkpoint(e):
        m = tiny_mlp()
        m.load_state_dict(states[e])
        return m.eval()

    trajectory = Trajectory(epochs, checkpoint, np.asarray(rates))
    return Task(model, x, y, 4, seed=0, trajectory=trajectory), x, y, checkpoint, np.asarray(rates)


def test_tracin_is_the_learning_rate_weighted_sum_over_checkpoints():
    task, x, y, checkpoint, rates = trained_with_trajectory(epochs=2)
    assert rates.shape == (2, 3) and rates[0, 0] > rates[1, -1]  # the linear schedule decays within the run
    qx, qy = data(5, (1, 3, 4), seed=9)
    want, selfs = 0, 0
    for e in (1, 2):  # τ = −Σ_c η_c ∇f(q; θ_c)·∇L(zᵢ; θ_c), η_c the epoch's mean learning rate
        m = checkpoint(e)
        gl = loop_grads(m, x, y, "loss")
        want = want - rates[e - 1].mean() * loop_grads(m, qx, qy, "margin") @ gl.T
        selfs = selfs + rates[e - 1].mean() * (gl ** 2).sum(1)
    s = registry.get("tracin")().fit(task)
    assert s.epochs == [1, 2] and s.info()["learning_rate_weights"] == pytest.approx(rates.mean(1).tolist())
    torch.testing.assert_close(s.scores(qx, qy, x, y).double(), want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(s.self_scores(x, y).double(), selfs, rtol=1e-6, atol=1e-8)
    # one checkpoint: the final model, weighted by the learning rate of the whole run it stands for
    last = checkpoint(2)
    one = -rates.mean(1).sum() * loop_grads(last, qx, qy, "margin") @ loop_grads(last, x, y, "loss").T
    torch.testing.assert_close(registry.get("tracin")(checkpoints=1).fit(task).scores(qx, qy, x, y).double(), one,
                               rtol=1e-6, atol=1e-8)


def test_tracin_needs_the_models_own_training_run():
    task, x, y, checkpoint, rates = trained_with_trajectory()
    with pytest.raises(SolverError, match="needs the model.s trajectory .*--explain zoo"):
        registry.get("tracin")().fit(dataclasses.replace(task, trajectory=None))
    other = Trajectory(2, lambda e: checkpoint(min(e, 1)), rates)  # ends one epoch early
    with pytest.raises(SolverError, match="last checkpoint differs from the explained model"):
        registry.get("tracin")().fit(dataclasses.replace(task, trajectory=other))
    with pytest.raises(SolverError, match="checkpoints must be a positive integer or 'all'"):
        registry.get("tracin")(checkpoints=0).fit(task)
    assert registry.get("tracin")(checkpoints=5).fit(task).epochs == [1, 2]  # capped at the run's epochs


# ---------------------------------------------------------------- K-FAC / EK-FAC damping

@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_relative_damping_is_absolute_damping_scaled_per_layer(name):
    """K-FAC is block-diagonal over layers, so layer l's part of the IHVP depends only on its own damping: with
    damping_mode="relative" it equals the absolute-mode IHVP at λ · (mean eigenvalue of layer l), layer by layer."""
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    rel = registry.get(name)(damping=0.1, damping_mode="relative", pseudo_labels="all").fit(task)
    eig = {path: e - 1.0 for path, e in registry.get(name)(damping=1.0, pseudo_labels="all").fit(task).scale.items()}
    means = {path: float(e.mean()) for path, e in eig.items()}
    out, slices = rel.ihvp(V), rel.layout.slices()
    for layer in rel.layers:
        torch.testing.assert_close(rel.scale[layer.path], eig[layer.path] + 0.1 * means[layer.path], **TIGHT)
        want = registry.get(name)(damping=0.1 * means[layer.path], pseudo_labels="all").fit(task).ihvp(V)
        for param in (layer.weight, layer.bias):
            torch.testing.assert_close(out[:, slices[param]], want[:, slices[param]], **TIGHT)
    assert max(means.values()) / min(means.values()) > 1.5  # the layers' curvature differs: so do the two modes
    with pytest.raises(SolverError, match="damping_mode must be one of"):
        registry.get(name)(damping_mode="per-layer").fit(task)


def test_kfac_family_searches_damping_mode_and_pseudo_labels():
    for name in ("kfac", "ekfac"):
        cls = registry.get(name)
        assert cls.parameters["damping_mode"] == ["absolute", "relative"]
        assert cls.parameters["pseudo_labels"] == ["sampled", "all"]
        assert cls.defaults["damping_mode"] == "absolute" and cls.defaults["pseudo_labels"] == "sampled"


# ---------------------------------------------------------------- end to end

QUIET = dict(device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    store = synthetic_store(tmp_path_factory.mktemp("new-solvers"))
    zoo_mod.build(settings.get("synthetic-mlp"), zoo_mod.ZooSpec(models=2), store=store, executor=LocalExecutor(1),
                  progress=False, log=lambda *a: None)
    return store


@pytest.mark.parametrize("name", ["trak", "tracin", "arnoldi", "datainf"])
def test_new_solvers_end_to_end_on_the_synthetic_ground_truth(zoo_store, name):
    setting = settings.get("synthetic-mlp")
    cls = registry.get(name)
    # TRAK's paper regime is k ≪ N: this ground truth has N = 256 training points
    grid = {"proj_dim": [16, 32]} if name == "trak" else None
    rec = records.run(zoo_store, setting, cls, explain="zoo", grid=grid, **QUIET)
    lds = rec["lds"]
    assert lds["explained"]["source"] == "zoo" and lds["selection"]["searched"]
    assert lds["mean"] > 0.3, (name, lds["mean"], lds["params"])
    assert all(t.get("validation_lds") is not None for t in lds["selection"]["trials"]), lds["selection"]["trials"]
    assert records.stale_reasons(rec, zoo_store, setting, cls) == {}
    if cls.needs_trajectory:  # the corrupted-label model comes without its training run
        assert "mislabel" not in rec
        with pytest.raises(records.RunError, match="no mislabel detection for tracin"):
            records.run(zoo_store, setting, cls, tasks=["mislabel"], **QUIET)
    else:
        assert rec["mislabel"]["auc"] > 0.6, (name, rec["mislabel"])
