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
from test_solvers import (MARK, data, dense_reference, loop_grads, mark_gradients, problem, query_grads, rel_err,
                         tiny_mlp)
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


def test_arnoldi_rank_one_keeps_the_top_eigenpair_and_info_reports_the_spectrum():
    """rank = 1 is the top eigenpair alone: (G + λI)⁻¹v ≈ u₁(u₁ᵀv)/(λ₁ + λ) with u₁, λ₁ from a dense eigh of G;
    one iteration is one Ritz pair, the Rayleigh quotient of its unit vector. info() reports the rank, the
    iterations actually run (capped at P) and the first and r-th kept eigenvalues."""
    task, _, _ = problem("mlp")
    V, _, _ = query_grads(task)
    P = sum(p.numel() for p in task.model.parameters())
    G = cv.dense_ggn(cv.FunctionalModel(task.model, torch.float64), task.train_x)
    evals, evecs = torch.linalg.eigh(G)
    u, lam1 = evecs[:, -1], float(evals[-1])
    one = registry.get("arnoldi")(rank=1, iterations=40, damping=0.1).fit(task)
    torch.testing.assert_close(one.ihvp(V), torch.outer(V @ u, u) / (lam1 + 0.1), rtol=1e-8, atol=1e-12)
    single = registry.get("arnoldi")(rank=1, iterations=1, damping=0.1).fit(task)
    q = single.eigenvectors[0]
    assert abs(float(q.norm()) - 1) < 1e-12
    torch.testing.assert_close(single.eigenvalues[0], q @ G @ q, rtol=1e-10, atol=0)
    assert single.info()["iterations"] == 1 and single.info()["rank"] == 1
    four = registry.get("arnoldi")(rank=4, iterations=40, damping=0.1).fit(task).info()
    assert (four["rank"], four["iterations"]) == (4, 40)
    assert four["eigenvalue_top"] == pytest.approx(lam1, rel=1e-8)
    assert four["eigenvalue_r"] == pytest.approx(float(evals[-4]), rel=1e-8)
    capped = registry.get("arnoldi")(rank=8, iterations=5 * P, damping=0.1).fit(task).info()
    assert (capped["rank"], capped["iterations"]) == (8, P)  # a Krylov space has at most P directions
    for bad, match in (({"rank": 0}, "rank must be a positive integer, got 0"),
                       ({"iterations": 0}, "iterations must be a positive integer, got 0"),
                       ({"iterations": True}, "iterations must be a positive integer, got True")):
        with pytest.raises(SolverError, match=match):
            registry.get("arnoldi")(**bad).fit(task)


def test_arnoldi_products_run_in_the_requested_precision_and_the_memo_keeps_precisions_apart():
    """A float32 model: the default float64 products make the inverse exact to float64 round-off (G of the float32
    weights, formed densely in float64), float32 products only to float32 round-off — and a float64 fit after a
    float32 one on the same task's cache must not reuse the float32 spectrum. ihvp answers in the vectors' dtype:
    float32 gradients of the model come back float32 (computed in float64, then rounded)."""
    task, _, _ = problem("mlp")
    model = copy.deepcopy(task.model).float()
    t32 = Task(model, task.train_x.float(), task.train_y, num_classes=4, seed=task.seed)
    V32, _, _ = query_grads(t32)
    assert V32.dtype == torch.float32
    P = sum(p.numel() for p in model.parameters())
    G = cv.dense_ggn(cv.FunctionalModel(model, torch.float64), t32.train_x)
    want = torch.linalg.solve(G + 0.1 * torch.eye(P, dtype=torch.float64), V32.double().T).T
    lo = registry.get("arnoldi")(rank=P, iterations=P, damping=0.1, precision="float32").fit(t32)
    hi = registry.get("arnoldi")(rank=P, iterations=P, damping=0.1).fit(t32)  # same task, same cache
    assert rel_err(hi.ihvp(V32.double()), want) < 1e-10
    assert 1e-9 < rel_err(lo.ihvp(V32.double()), want) < 1e-3
    out = hi.ihvp(V32)
    assert out.dtype == torch.float32
    assert torch.equal(out, hi.ihvp(V32.double()).float())


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


def test_datainf_reports_each_layers_damping_and_answers_in_the_vectors_dtype():
    """info()["layer_damping"] is λ_l = c · mean of the layer's squared loss-gradient entries (plain autograd
    loop), per parameter tensor; on a float32 model, float32 vectors come back float32: the float64 result rounded."""
    task, x, y = problem("mlp")
    gt = loop_grads(task.model, x, y, "loss")
    c = 0.3
    info = registry.get("datainf")(damping=c).fit(task).info()
    want, start = {}, 0
    for name, p in task.model.named_parameters():
        want[name] = c * float((gt[:, start:start + p.numel()] ** 2).mean())
        start += p.numel()
    assert info["layer_damping"].keys() == want.keys()
    for name in want:
        assert info["layer_damping"][name] == pytest.approx(want[name], rel=1e-10), name
    t32 = Task(copy.deepcopy(task.model).float(), x.float(), y, num_classes=4, seed=task.seed)
    V32, _, _ = query_grads(t32)
    s = registry.get("datainf")(damping=c).fit(t32)
    out = s.ihvp(V32)
    assert out.dtype == torch.float32
    assert torch.equal(out, s.ihvp(V32.double()).float())


def test_datainf_names_the_training_example_whose_gradient_is_not_finite(monkeypatch):
    """A NaN loss gradient of training example 7 (as an overflowing model would give; marked here by an input
    value) is named by its index in the whole set, in blocks of 3, both in fit's damping pass and in an ihvp's sweep."""
    task, x, y = problem("mlp", n=10)
    mx = x.clone()
    mx[7, 0, 0, 0] = MARK
    marked_task = Task(task.model, mx, y, num_classes=4, seed=task.seed)
    monkeypatch.setenv("TDABENCH_SCORE_MEMORY_MB", "0.01")  # train blocks of 3 rows of the 106 parameters
    assert registry.get("datainf")().fit(task).chunk_sizes()[1] == 3
    s = registry.get("datainf")().fit(marked_task)  # finite gradients until they are marked
    mark_gradients(monkeypatch, float("nan"))
    with pytest.raises(SolverError, match="non-finite train loss gradient for example 7 "):
        s.ihvp(torch.ones(1, 106, dtype=torch.float64))
    with pytest.raises(SolverError, match="non-finite train loss gradient for example 7 "):
        registry.get("datainf")().fit(dataclasses.replace(marked_task, cache=cv.CurvatureCache()))


def test_datainf_moves_cpu_vectors_to_the_model_device(monkeypatch):
    """"meta" stands in for a GPU on the CPU-only test machines (shapes and dtypes, no data): fitted on the CPU (the
    layer damping reads values, which meta tensors do not have), then given the model on meta as if fitted there,
    CPU vectors (float32, too) must be moved to the model's device: the answer is on meta in the vectors' dtype.
    The finiteness check of the train gradients reads values too, so it is switched off."""
    task, _, _ = problem("mlp", n=10)
    s = registry.get("datainf")(damping=0.3).fit(task)
    s.fm = cv.FunctionalModel(copy.deepcopy(task.model).to("meta"))
    monkeypatch.setattr(cv, "check_finite", lambda *args, **kwargs: None)
    V = torch.ones(2, s.fm.numel, dtype=torch.float32)
    got = s.ihvp(V)
    assert (got.device.type, got.shape, got.dtype) == ("meta", V.shape, torch.float32)


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


def trak_kernel_formula(task, k, damping, seed):
    """R written out as a float64 matrix, the kernel ΦᵀΦ/N of the projected margin gradients (plain autograd loop,
    φᵢ = Rᵀ∇f(zᵢ)) and λ̃ = damping · tr(ΦᵀΦ/N)/k (damping times its mean eigenvalue)."""
    R = cv.RandomProjection(sum(p.numel() for p in task.model.parameters()), k, seed).matrix().double()
    phi = loop_grads(task.model, task.train_x, task.train_y, "margin").double() @ R
    K = phi.T @ phi / len(task.train_y)
    return R, K, damping * float(K.trace()) / k


def test_trak_ihvp_is_the_implicit_inverse_and_info_reports_its_kernel_ridge_and_projection():
    """ihvp(v) = R(ΦᵀΦ/N + λ̃I)⁻¹Rᵀv with R written out. With λ̃ = the kernel's mean eigenvalue (damping 1) the kernel
    is well conditioned, so the match is to float64 round-off (λ̃ rounded to float32 would be off by ~1e-8). A fit
    with another seed on the same task's cache gets the kernel of its own projection. info() reports k, λ̃, the mean
    eigenvalue tr(ΦᵀΦ/N)/k, the smallest Cholesky pivot and R's 4·P·k bytes in MiB. Float32 vectors come back
    float32, the float64 product rounded: at damping 1e-4 the kernel's condition number is ~1e4, so a projection
    in float32 would lose two digits. A float32 model's query features are float64 solves of its float32 gradients."""
    task, _, _ = problem("mlp")
    V, qx, qy = query_grads(task)
    k = 40
    for seed in (3, 4):
        t = dataclasses.replace(task, seed=seed)  # the same cache: the kernel must be keyed by the seed
        s = registry.get("trak")(proj_dim=k, damping=1.0).fit(t)
        R, K, ridge = trak_kernel_formula(t, k, 1.0, seed)
        A = K + ridge * torch.eye(k, dtype=K.dtype)
        assert rel_err(s.ihvp(V), (R @ torch.linalg.solve(A, (V @ R).T)).T) < 1e-10
        info = s.info()
        assert info["proj_dim"] == k
        assert info["kernel_mean_eigenvalue"] == pytest.approx(float(K.trace()) / k, rel=1e-12)
        assert info["ridge"] == pytest.approx(ridge, rel=1e-12)
        pivots = torch.linalg.cholesky(A).diagonal() ** 2
        assert info["cholesky_pivot_min"] == pytest.approx(float(pivots.min()), rel=1e-10)
        assert info["projection_held_mb"] == 4 * 106 * k / 2**20
    s = registry.get("trak")(proj_dim=k, damping=1e-4).fit(task)
    R, K, ridge = trak_kernel_formula(task, k, 1e-4, task.seed)
    A = K + ridge * torch.eye(k, dtype=K.dtype)
    assert float(torch.linalg.cond(A)) > 1e3
    V32 = V.float()
    out = s.ihvp(V32)
    assert out.dtype == torch.float32
    assert rel_err(out.double(), (R @ torch.linalg.solve(A, (V32.double() @ R).T)).T) < 3e-7
    assert torch.equal(out, s.ihvp(V32.double()).float())
    m32 = copy.deepcopy(task.model).float()
    t32 = Task(m32, task.train_x.float(), task.train_y, num_classes=4, seed=task.seed)
    R, K, ridge = trak_kernel_formula(t32, k, 1.0, t32.seed)
    a = registry.get("trak")(proj_dim=k, damping=1.0).fit(t32).query_features(qx.float(), qy)
    want = torch.linalg.solve(K + ridge * torch.eye(k, dtype=K.dtype),
                              (loop_grads(m32, qx.float(), qy, "margin").double() @ R).T).T
    assert a.dtype == torch.float64 and rel_err(a, want) < 1e-5  # kernel from float32 products: float32 round-off


def test_trak_self_influence_with_and_without_the_reweighting():
    """self(i) = ∇L(zᵢ)ᵀR(ΦᵀΦ/N + λ̃I)⁻¹Rᵀ∇L(zᵢ) = (1 − pᵢ)² φᵢᵀ(ΦᵀΦ/N + λ̃I)⁻¹φᵢ with the reweighting
    (∇L = −(1 − p)∇f); without it the train features are −φᵢ and self(i) = (1 − pᵢ) φᵢᵀ(ΦᵀΦ/N + λ̃I)⁻¹φᵢ, in blocks
    that split the set."""
    task, x, y = problem("mlp")
    k, damping = 40, 1e-2
    R, K, ridge = trak_kernel_formula(task, k, damping, task.seed)
    phi = loop_grads(task.model, x, y, "margin") @ R
    quad = (torch.linalg.solve(K + ridge * torch.eye(k, dtype=K.dtype), phi.T).T * phi).sum(1)
    p = torch.softmax(task.model(x), -1).gather(1, y[:, None]).squeeze(1).detach()
    for reweight, want in ((True, (1 - p) ** 2 * quad), (False, (1 - p) * quad)):
        s = registry.get("trak")(proj_dim=k, damping=damping, reweight=reweight).fit(task)
        torch.testing.assert_close(s.self_scores(x, y, train_chunk=7).double(), want, rtol=1e-5, atol=1e-8)


def test_trak_refuses_a_bad_proj_dim_and_a_ridge_below_the_kernels_float64_resolution():
    """proj_dim must be a positive integer. A ridge of 1e-14 × the mean eigenvalue on a rank-48 kernel of dimension
    106: Cholesky succeeds (its smallest pivots are about the ridge, positive) but they are below what float64
    resolves in the kernel (k·eps·its largest diagonal entry), so the kernel is refused as singular."""
    task, _, _ = problem("mlp")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SolverError, match="trak: proj_dim must be a positive integer"):
            registry.get("trak")(proj_dim=bad).fit(task)
    with pytest.raises(SolverError, match=r"kernel .* \(k = 106\) is singular with damping=1e-14"):
        registry.get("trak")(proj_dim=106, damping=1e-14).fit(task)


def test_trak_and_tracin_name_the_example_whose_gradient_is_not_finite(monkeypatch):
    """Direct calls of the features count rows from 0 (the default offset); self-influence in blocks names the
    example by its index in the whole set — for TRAK without reweighting also when only its margin gradient is
    non-finite (its loss gradients are checked first and pass)."""
    task, x, y = problem("mlp", n=10)
    bad_x = x.clone()
    bad_x[7, 0, 0, 0] = float("inf")
    plain = registry.get("trak")(proj_dim=8, damping=0.1, reweight=False).fit(task)
    for s in (registry.get("trak")(proj_dim=8, damping=0.1).fit(task), plain, registry.get("tracin")().fit(task)):
        with pytest.raises(SolverError, match="non-finite train (loss|margin) gradient for example 2 "):
            s.train_features(bad_x[5:], y[5:])
        with pytest.raises(SolverError, match=r"non-finite query gradient \(margin\) for example 2 "):
            s.query_features(bad_x[5:], y[5:])
        with pytest.raises(SolverError, match="non-finite train loss gradient for example 7 "):
            s.self_scores(bad_x, y, train_chunk=3)
    mark_gradients(monkeypatch, float("nan"), "margin")
    mx = x.clone()
    mx[7, 0, 0, 0] = MARK
    with pytest.raises(SolverError, match="non-finite train margin gradient for example 7 "):
        plain.self_scores(mx, y, train_chunk=3)


def test_trak_and_tracin_feature_keys_are_equal_exactly_when_their_train_features_are():
    """feature_key decides which configurations of one model share a pass over the training set (scores_many,
    train_subset_sums): equal keys must mean equal train features, different train features different keys.
    TRAK's damping is not in its train features, nor is a proj_dim above P (capped) or TracIn's checkpoints above
    the run's 2 epochs; the seed (R), the reweighting, the attributed parameters and the checkpoints are."""
    task, x, y = problem("mlp")

    def fitted(name, t=task, **kw):
        return registry.get(name)(**kw).fit(t)

    groups = [[fitted("trak", proj_dim=40), fitted("trak", proj_dim=40, damping=0.1)],
              [fitted("trak", proj_dim=200), fitted("trak", proj_dim=1000)],
              [fitted("trak", proj_dim=40, reweight=False)],
              [fitted("trak", dataclasses.replace(task, seed=4), proj_dim=40)],
              [fitted("trak", proj_dim=40, last_blocks=1)],
              [fitted("tracin"), fitted("tracin", checkpoints=5)],
              [fitted("tracin", checkpoints=1)],
              [fitted("tracin", last_blocks=1)]]
    keys = [[s.feature_key() for s in g] for g in groups]
    feats = [[s.train_features(x[:6], y[:6]) for s in g] for g in groups]
    for kk, ff in zip(keys, feats):
        assert all(k == kk[0] for k in kk) and all(torch.equal(f, ff[0]) for f in ff)
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            assert keys[i][0] != keys[j][0]
            assert feats[i][0].shape != feats[j][0].shape or not torch.allclose(feats[i][0], feats[j][0])


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


def test_tracin_features_dimension_info_head_only_attribution_and_the_trajectorys_shape():
    """The features are the c checkpoints' √η_c-scaled gradients over the attributed parameters: their length is
    feature_dim() = c·P, and with last_blocks=1 P counts the head (28 of 106 parameters) in every checkpoint and the
    scores are the formula over the head's gradients. info() names the checkpoints and the run's epochs. The
    trajectory needs one row of step learning rates per epoch and at least one step an epoch; one step an epoch
    (full-batch training) is valid: with each epoch's mean rate as its only step, the weights η_c are unchanged."""
    task, x, y = problem("mlp")  # toy trajectory: 2 epochs of 3 steps
    rates = task.trajectory.learning_rates
    s = registry.get("tracin")().fit(task)
    assert s.feature_dim() == 2 * 106 == s.train_features(x[:3], y[:3]).shape[1]
    assert s.query_features(x[:3], y[:3]).shape[1] == 2 * 106
    assert s.info()["epochs"] == 2 and s.info()["checkpoint_epochs"] == [1, 2]
    head = registry.get("tracin")(last_blocks=1).fit(task)
    assert head.feature_dim() == 2 * 28 == head.train_features(x[:3], y[:3]).shape[1]
    qx, qy = data(4, (1, 3, 4), seed=9)
    want = 0
    for e in (1, 2):  # the head's parameters (3.weight, 3.bias) are the last 28 of the flat gradient
        m = task.trajectory.checkpoint(e)
        gq, gl = loop_grads(m, qx, qy, "margin")[:, -28:], loop_grads(m, x, y, "loss")[:, -28:]
        want = want - rates[e - 1].mean() * gq @ gl.T
    torch.testing.assert_close(head.scores(qx, qy, x, y).double(), want, rtol=1e-6, atol=1e-8)
    one_step = Trajectory(2, task.trajectory.checkpoint, rates.mean(1, keepdims=True))
    full_batch = registry.get("tracin")().fit(dataclasses.replace(task, trajectory=one_step))
    assert full_batch.etas == pytest.approx(rates.mean(1).tolist(), rel=1e-12)
    for bad in (rates[:1], np.vstack([rates, rates[:1]]), rates[:, :0], rates.reshape(-1)):
        with pytest.raises(SolverError, match="need one row of step learning rates per epoch"):
            registry.get("tracin")().fit(dataclasses.replace(task, trajectory=Trajectory(2, task.trajectory.checkpoint,
                                                                                         bad)))


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
