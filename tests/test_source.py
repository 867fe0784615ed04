"""SOURCE and exact unrolled differentiation against truths computed another way.

* unrolled: equals central finite differences of actual retraining (the same batches, learning rates, momentum
  and weight decay, with zᵢ's weight in the batch loss perturbed by ±ε), float64, to 1e-6 relative — the
  difference quotient's own error at ε = 1e-6 is ~1e-9, so this is rounding, not method error.
* source: where EK-FAC is exact (one Linear layer whose examples share a logit Hessian), its multi-segment
  formula equals the same formula built from dense Gauss-Newton matrices with ``torch.linalg.matrix_exp`` and a
  solve, to 1e-8; as the segment time T → ∞ it is the influence function (EK-FAC with damping λ + μ), exactly; as
  T → 0 it is −Σ_ℓ T_ℓ⟨∇f, ḡ_ℓ⟩ to O(T·λ_max); with tiny steps and no momentum it equals the unrolled reference
  (the two scale their batches the same way).
* both refuse a task without a trajectory, naming ``--explain zoo``, and run end to end on a zoo.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import synthetic_store
from torch import nn

from benchmark import core
from benchmark.core.measurements import MEASUREMENTS
from benchmark.evaluate import SolverError, Task, Trajectory, engine, record_trajectory, records, registry, scores_many
from benchmark.evaluate.engine import RunError
from benchmark.setup import settings
from benchmark.setup.config import TrainRecipe
from benchmark.setup.training import _epoch_batches, _lr_at, _order_generator, _steps_per_epoch

RECIPE = TrainRecipe(epochs=3, batch_size=8, lr=0.3, momentum=0.9, weight_decay=1e-2)  # 42 points: 5 batches of 8, 1 of 2


def tiny_problem(n=42, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    init = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    qx = torch.randn(3, 1, 2, 3, generator=g, dtype=torch.float64)
    return init, x, y, qx, torch.tensor([0, 1, 2])


def weighted_run(init, x, y, recipe, seed, weights, from_epoch=0):
    """``train``'s loop written out with per-example weights in each batch's mean loss, (1/|B|) Σ wⱼ Lⱼ, applied
    from epoch ``from_epoch`` on: the same batches in the same order, learning rates, momentum and weight decay."""
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    gen, n = _order_generator(seed), len(y)
    total, step = recipe.epochs * _steps_per_epoch(n, recipe), 0
    for epoch in range(recipe.epochs):
        for batch in _epoch_batches(n, recipe, gen):
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe, step, total)
            w = weights[batch] if epoch >= from_epoch else torch.ones(len(batch), dtype=weights.dtype)
            opt.zero_grad()
            (w * F.cross_entropy(model(x[batch]), y[batch], reduction="none")).mean().backward()
            opt.step()
            step += 1
    return model.eval()


def margins(model, qx, qy):
    with torch.no_grad():
        return MEASUREMENTS["margin"](model(qx), qy)


@pytest.mark.parametrize("window", [None, 1])
def test_unrolled_equals_finite_difference_retraining(window):
    """τ(q, i) = d margin / dε for the objective J + εLᵢ: in each batch zᵢ's weight is 1 + εN (its batch term then
    is ε(N/|B|)Lᵢ). ``epochs=1`` unrolls the last epoch only, so the perturbation starts there."""
    init, x, y, qx, qy = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    ones = torch.ones(len(y), dtype=torch.float64)
    plain = weighted_run(init, x, y, RECIPE, 5, ones)
    for p, q in zip(plain.parameters(), model.parameters()):  # the written-out loop is train()'s
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    solver = registry.get("unrolled")(epochs=window).fit(Task(model, x, y, 3, trajectory=trajectory))
    tau = solver.scores(qx, qy, x, y).double()
    from_epoch = 0 if window is None else RECIPE.epochs - window
    eps = 1e-6
    points = [0, 7, 13, 20, 41]
    fd = torch.empty(len(qy), len(points), dtype=torch.float64)
    for j, i in enumerate(points):
        up, down = ones.clone(), ones.clone()
        up[i] += eps * len(y)
        down[i] -= eps * len(y)
        fd[:, j] = (margins(weighted_run(init, x, y, RECIPE, 5, up, from_epoch), qx, qy)
                    - margins(weighted_run(init, x, y, RECIPE, 5, down, from_epoch), qx, qy)) / (2 * eps)
    assert fd.abs().max() > 1e-2  # the perturbation does move the margins
    torch.testing.assert_close(tau[:, points], fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))
    info = solver.info()
    assert info["replay_max_relative_deviation"] == 0.0 and info["steps_unrolled"] == (18 if window is None else 6)


def test_unrolled_refuses_a_run_it_cannot_replay():
    init, x, y, _, _ = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    wrong = Trajectory(trajectory.epochs, trajectory.checkpoint, trajectory.learning_rates, RECIPE, seed=6)
    with pytest.raises(SolverError, match="does not reproduce the saved checkpoint of epoch 1"):
        registry.get("unrolled")().fit(Task(model, x, y, 3, trajectory=wrong))
    with pytest.raises(SolverError, match="epochs must be None"):
        registry.get("unrolled")(epochs=4).fit(Task(model, x, y, 3, trajectory=trajectory))


def test_unrolled_refuses_window_counts_that_are_not_integers_and_schedules_off_in_the_tenth_digit():
    """The window is a whole number of epochs (True and 2.0 are not); the recorded learning rates must be the
    replayed ones to 1e-12 relative, so a schedule that differs by 1e-10 (3e-10 relative at lr 0.3) is not the
    recipe's and is refused, even though it is within numpy's default absolute tolerance."""
    init, x, y, _, _ = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    for window in (True, 2.0):
        with pytest.raises(SolverError, match="epochs must be None"):
            registry.get("unrolled")(epochs=window).fit(Task(model, x, y, 3, trajectory=trajectory))
    rates = trajectory.learning_rates.copy()
    rates[0, 0] += 1e-10
    off = Trajectory(trajectory.epochs, trajectory.checkpoint, rates, RECIPE, trajectory.seed)
    with pytest.raises(SolverError, match="replayed learning rates of epoch 1 differ"):
        registry.get("unrolled")().fit(Task(model, x, y, 3, trajectory=off))


def test_unrolled_replays_a_float32_run_at_the_explained_models_float64_precision():
    """Checkpoints saved in float32, the model explained in float64: the run is replayed in float64 from the
    (exactly representable) float32 initial weights, so its steps are those of the float64 run from the same start
    — the scores equal, bit for bit, those of a solver given that float64 run's own trajectory — and the recorded
    deviation from the float32 checkpoints is float32 rounding: above 0, within the tolerance."""
    init, x, y, qx, qy = tiny_problem()
    init32, x64 = copy.deepcopy(init).float(), x.float().double()
    _, saved32 = record_trajectory(init32, x64.float(), y, RECIPE, seed=5)
    explained, run64 = record_trajectory(copy.deepcopy(init32).double(), x64, y, RECIPE, seed=5)
    from32 = registry.get("unrolled")().fit(Task(explained, x64, y, 3, trajectory=saved32))
    from64 = registry.get("unrolled")().fit(Task(explained, x64, y, 3, trajectory=run64))
    assert torch.equal(from32.scores(qx, qy, x64, y), from64.scores(qx, qy, x64, y))
    assert 0 < from32.info()["replay_max_relative_deviation"] <= 1e-5
    assert from64.info()["replay_max_relative_deviation"] == 0.0


def test_unrolled_replays_a_float32_model_of_float64_data_in_the_models_precision():
    """The replay runs in the explained model's precision, its training data too: a float32 model given float64 data
    replays exactly the steps it replays given that data rounded to float32 (no dtype clash mid-training)."""
    init, x, y, qx, qy = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    m32 = copy.deepcopy(model).float()
    given64 = registry.get("unrolled")().fit(Task(m32, x, y, 3, trajectory=trajectory))
    given32 = registry.get("unrolled")().fit(Task(m32, x.float(), y, 3, trajectory=trajectory))
    assert given64.states.dtype == torch.float32 and torch.equal(given64.states, given32.states)
    assert torch.equal(given64.scores(qx, qy, x, y), given32.scores(qx, qy, x, y))


def test_unrolled_self_scores_in_blocks_are_the_diagonal_of_the_loss_scores():
    """self_scores = −τ_loss(i, i): with blocks of 16 queries (42 points: blocks 0-15, 16-31, 32-41) each block's
    diagonal is taken at its own rows and columns. The score matrix does not depend on the query blocks either."""
    init, x, y, _, _ = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    solver = registry.get("unrolled")().fit(Task(model, x, y, 3, measurement="loss", trajectory=trajectory))
    full = solver.scores(x, y, x, y)
    torch.testing.assert_close(solver.scores(x, y, x, y, query_chunk=16), full, rtol=1e-6, atol=1e-7)
    solver.ihvp_block = 16  # the query block self_scores uses
    torch.testing.assert_close(solver.self_scores(x, y), -full.diagonal(), rtol=1e-6, atol=1e-7)


def test_unrolled_info_records_the_replay_window_and_its_duration_in_milliseconds(monkeypatch):
    """A fake clock (the replay takes 2.3456789 s by it): replay_seconds is that, to the millisecond."""
    import sys
    import types

    init, x, y, _, _ = tiny_problem()
    model, trajectory = record_trajectory(init, x, y, RECIPE, seed=5)
    unrolled = registry.get("unrolled")
    clock = iter([100.0, 102.3456789])
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(sys.modules[unrolled.__module__], "time", fake_time)
    info = unrolled(epochs=2).fit(Task(model, x, y, 3, trajectory=trajectory)).info()
    assert info["replay_seconds"] == 2.346
    assert info["epochs_unrolled"] == 2 and info["steps_unrolled"] == 12  # 6 steps an epoch (5 batches of 8, 1 of 2)


@pytest.mark.parametrize("name", ["source", "unrolled"])
def test_refused_without_a_trajectory(name):
    init, x, y, _, _ = tiny_problem()
    with pytest.raises(SolverError, match="needs the model's trajectory.*--explain zoo"):
        registry.get(name)().fit(Task(init, x, y, 3))


# ---------------------------------------------------------------- SOURCE against dense linear algebra

def flat_linear_checkpoints(epochs=4, seed=0):
    """Checkpoints of one Linear layer with zero weights and a different bias each epoch: every example has the
    same logit Hessian, so G = E[x̃x̃ᵀ] ⊗ (diag p − ppᵀ) is a Kronecker product and EK-FAC is exact."""
    g = torch.Generator().manual_seed(seed)
    biases = torch.randn(epochs + 1, 3, generator=g, dtype=torch.float64)

    def checkpoint(e):
        m = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
        with torch.no_grad():
            m[1].weight.zero_()
            m[1].bias.copy_(biases[e])
        return m.eval()

    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    qx = torch.randn(4, 5, generator=g, dtype=torch.float64)
    return checkpoint, x, y, qx, torch.tensor([0, 1, 2, 0])


def dense_source(checkpoint, rates, recipe, bounds, damping, gradients, x, y, qx, qy):
    """−Σ_ℓ ⟨(I − S_ℓ)H̃_ℓ⁻¹ S_{ℓ+1}⋯S_L ∇f, ḡ_ℓ⟩ from dense matrices: H̃_ℓ = G(θ_ℓ) + (μ + λ)I at the checkpoint
    closing segment ℓ, S_ℓ = matrix_exp(−T_ℓ H̃_ℓ), T_ℓ = Σ η / (1 − β)."""
    epochs = len(rates)
    fms = {e: core.FunctionalModel(checkpoint(e)) for e in range(1, epochs + 1)}
    v = core.per_sample_grads(fms[epochs], qx, qy, "margin")
    tau = torch.zeros(len(qy), len(y), dtype=torch.float64)
    for start, end in reversed(bounds):
        G = core.dense_ggn(fms[end], x)
        H = G + (recipe.weight_decay + damping) * torch.eye(len(G), dtype=G.dtype)
        T = rates[start:end].sum() / (1 - recipe.momentum)
        S = torch.linalg.matrix_exp(-T * H)
        a = torch.linalg.solve(H, (torch.eye(len(G), dtype=G.dtype) - S) @ v.T).T
        used = [end] if gradients == "end" else range(start + 1, end + 1)
        g = sum(core.per_sample_grads(fms[e], x, y, "loss") for e in used) / len(used)
        tau -= a @ g.T
        v = v @ S
    return tau


@pytest.mark.parametrize("gradients", ["end", "mean"])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_source_equals_the_dense_segment_formula_where_ekfac_is_exact(gradients, damping):
    checkpoint, x, y, qx, qy = flat_linear_checkpoints()
    rates = np.array([[0.5, 0.4, 0.3], [0.3, 0.25, 0.2], [0.2, 0.1, 0.1], [0.05, 0.05, 0.02]])
    recipe = TrainRecipe(epochs=4, batch_size=10, lr=0.5, momentum=0.5, weight_decay=0.05)
    task = Task(checkpoint(4), x, y, 3, trajectory=Trajectory(4, checkpoint, rates, recipe, seed=0))
    s = registry.get("source")(segments=2, damping=damping, gradients=gradients, pseudo_labels="all").fit(task)
    want = dense_source(checkpoint, rates, recipe, [(0, 2), (2, 4)], damping, gradients, x, y, qx, qy)
    torch.testing.assert_close(s.scores(qx, qy, x, y).double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    # float64 features, float32 scores: compare the bilinear form itself at full precision
    exact = -(s.query_features(qx, qy) @ s.train_features(x, y).T)
    torch.testing.assert_close(exact, want, rtol=1e-9, atol=1e-10 * float(want.abs().max()))
    assert [seg["time"] for seg in s.info()["segments"]] == pytest.approx([3.9, 1.04])
    # the wrong propagation order (S applied to the segment's own response) is far from it
    wrong = dense_source(checkpoint, rates, recipe, [(0, 2), (2, 4)][::-1], damping, gradients, x, y, qx, qy)
    assert not torch.allclose(wrong, want, rtol=1e-3)


FLAT_RATES = np.array([[0.5, 0.4, 0.3], [0.3, 0.25, 0.2], [0.2, 0.1, 0.1], [0.05, 0.05, 0.02]])
FLAT_RECIPE = TrainRecipe(epochs=4, batch_size=10, lr=0.5, momentum=0.5, weight_decay=0.05)


def test_source_takes_float32_checkpoints_at_the_explained_models_float64_precision():
    """Checkpoints saved in float32, the model explained in float64: gradients and curvature are computed in
    float64 from the float32 weights, so the dense formula (float64) holds to 1e-9 — float32 arithmetic would
    be off by ~1e-7."""
    checkpoint, x, y, qx, qy = flat_linear_checkpoints()
    saved = lambda e: checkpoint(e).float()  # noqa: E731
    as64 = lambda e: saved(e).double()  # noqa: E731
    task = Task(as64(4), x, y, 3, trajectory=Trajectory(4, saved, FLAT_RATES, FLAT_RECIPE, seed=0))
    s = registry.get("source")(segments=2, pseudo_labels="all").fit(task)
    b = s.train_features(x, y)
    want = dense_source(as64, FLAT_RATES, FLAT_RECIPE, [(0, 2), (2, 4)], 0.0, "end", x, y, qx, qy)
    torch.testing.assert_close(-(s.query_features(qx, qy).double() @ b.double().T), want, rtol=1e-9,
                               atol=1e-10 * float(want.abs().max()))
    assert b.dtype == torch.float64


def test_source_info_and_feature_layout_follow_the_segments():
    """info() names each segment's epochs (1-based, inclusive), its closing checkpoint and its time Σ η / (1 − β),
    and the recipe's momentum and weight decay. Every segment count and gradient estimator has the same train
    features (the loss gradients at every epoch, E·P numbers), hence one feature_key and one shared pass; a run
    with another number of epochs, or another solver's features, has another key."""
    checkpoint, x, y, qx, qy = flat_linear_checkpoints()
    task = Task(checkpoint(4), x, y, 3, trajectory=Trajectory(4, checkpoint, FLAT_RATES, FLAT_RECIPE, seed=0))
    source = registry.get("source")
    fitted = [source(segments=2, pseudo_labels="all").fit(task), source(segments=4, gradients="mean").fit(task)]
    info = [s.info() for s in fitted]
    assert info[0]["segments"] == [{"epochs": [1, 2], "checkpoint": 2, "time": 3.9},
                                   {"epochs": [3, 4], "checkpoint": 4, "time": 1.04}]
    assert info[1]["segments"] == [{"epochs": [e, e], "checkpoint": e, "time": t}
                                   for e, t in zip(range(1, 5), [2.4, 1.5, 0.8, 0.24])]
    assert [(i["pseudo_labels"], i["gradients"], i["momentum"], i["weight_decay"], i["layers"]) for i in info] == [
        ("all", "end", 0.5, 0.05, ["1"]), ("sampled", "mean", 0.5, 0.05, ["1"])]
    b = [s.train_features(x, y) for s in fitted]
    assert b[0].shape == (30, 4 * 18) and all(s.feature_dim() == 4 * 18 for s in fitted)  # P = 5·3 + 3
    assert torch.equal(b[0], b[1]) and fitted[0].feature_key() == fitted[1].feature_key()
    for got, alone in zip(scores_many(fitted, qx, qy, x, y), [s.scores(qx, qy, x, y) for s in fitted]):
        torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-7)
    three = Trajectory(3, checkpoint, FLAT_RATES[:3], FLAT_RECIPE, seed=0)
    shorter = source().fit(Task(checkpoint(4), x, y, 3, trajectory=three))
    assert shorter.feature_dim() == 3 * 18 and shorter.feature_key() != fitted[0].feature_key()
    assert registry.get("ekfac")().fit(task).feature_key() != fitted[0].feature_key()


def test_source_fits_from_a_shared_cache_as_from_a_fresh_one_whatever_the_seed():
    """Sampled pseudo-labels depend on the task's seed: a fit for seed 1 after one for seed 0 on the same cache
    must not reuse seed 0's EK-FAC (it equals a fit for seed 1 on a fresh cache, and differs from seed 0's)."""
    checkpoint, x, y, qx, qy = flat_linear_checkpoints()
    trajectory = Trajectory(4, checkpoint, FLAT_RATES, FLAT_RECIPE, seed=0)
    shared = Task(checkpoint(4), x, y, 3, trajectory=trajectory).cache

    def features(seed, cache):
        task = Task(checkpoint(4), x, y, 3, seed=seed, cache=cache, trajectory=trajectory)
        return registry.get("source")(pseudo_labels="sampled").fit(task).query_features(qx, qy)

    seed0 = features(0, shared)
    fresh1 = features(1, Task(checkpoint(4), x, y, 3).cache)
    assert torch.equal(features(1, shared), fresh1)
    assert not torch.allclose(seed0, fresh1, rtol=1e-3)


def test_source_names_the_example_with_non_finite_gradients_by_its_index():
    checkpoint, x, y, qx, qy = flat_linear_checkpoints()
    task = Task(checkpoint(4), x, y, 3, trajectory=Trajectory(4, checkpoint, FLAT_RATES, FLAT_RECIPE, seed=0))
    s = registry.get("source")().fit(task)
    bad_x, bad_qx = x.clone(), qx.clone()
    bad_x[5, 0], bad_qx[2, 1] = float("nan"), float("inf")
    with pytest.raises(SolverError, match=r"train loss gradient for example 5 \(rows 0\.\.29 checked\)"):
        s.train_features(bad_x, y)
    with pytest.raises(SolverError, match=r"for example 2 \(rows 0\.\.3 checked\)"):
        s.query_features(bad_qx, qy)
    with pytest.raises(SolverError, match=r"for example 5 \(rows 3\.\.9 checked\)"):
        s.train_features(bad_x[3:10], y[3:10], 3)


def trained_cnn_task(rates_scale):
    """A tiny CNN trained by mini-batch SGD, its trajectory's learning rates multiplied by ``rates_scale``."""
    torch.manual_seed(0)
    init = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(27, 4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (40,), generator=g)
    recipe = TrainRecipe(epochs=4, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, traj = record_trajectory(init, x, y, recipe, seed=2)
    traj = Trajectory(traj.epochs, traj.checkpoint, traj.learning_rates * rates_scale, recipe, traj.seed)
    qx, qy = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    return Task(model, x, y, 4, trajectory=traj), qx, qy


def test_source_is_the_influence_function_for_a_long_last_segment():
    """One segment, T → ∞: (I − e^{−TH̃})H̃⁻¹ → H̃⁻¹, the EK-FAC influence function with damping λ + μ."""
    task, qx, qy = trained_cnn_task(1e9)
    mu = task.trajectory.recipe.weight_decay
    for damping in (0.0, 1e-2):
        source = registry.get("source")(segments=1, damping=damping).fit(task)
        ekfac = registry.get("ekfac")(damping=damping + mu).fit(task)
        torch.testing.assert_close(source.query_features(qx, qy)[:, -ekfac.feature_dim():],
                                   ekfac.query_features(qx, qy), rtol=1e-10, atol=0)
        torch.testing.assert_close(source.scores(qx, qy, task.train_x, task.train_y),
                                   ekfac.scores(qx, qy, task.train_x, task.train_y), rtol=1e-6, atol=1e-7)


def test_source_is_the_time_weighted_gradient_product_for_short_segments():
    """T → 0: S → I and (I − e^{−TH̃})H̃⁻¹ → T·I, so τ → −Σ_ℓ T_ℓ ⟨∇f(θ_T), ḡ_ℓ⟩ with T_ℓ = Σ η/(1 − β): the segment
    times (momentum included) and the placement of each segment's gradients, checked to O(T λ_max)."""
    task, qx, qy = trained_cnn_task(1e-6)
    x, y, traj = task.train_x, task.train_y, task.trajectory
    fm = {e: core.FunctionalModel(traj.checkpoint(e)) for e in range(1, 5)}
    gq = core.per_sample_grads(fm[4], qx, qy, "margin")
    for gradients in ("end", "mean"):
        s = registry.get("source")(segments=2, damping=0.0, gradients=gradients).fit(task)
        want = torch.zeros(len(qy), len(y), dtype=torch.float64)
        for start, end in [(0, 2), (2, 4)]:
            T = traj.learning_rates[start:end].sum() / (1 - traj.recipe.momentum)
            used = [end] if gradients == "end" else range(start + 1, end + 1)
            want -= T * gq @ (sum(core.per_sample_grads(fm[e], x, y, "loss") for e in used) / len(used)).T
        got = -(s.query_features(qx, qy) @ s.train_features(x, y).T)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_source_equals_unrolled_where_its_assumptions_hold():
    """Tiny steps (the weights hardly move: stationary curvature and gradients), no momentum, a constant schedule
    and full batches of 8: every point is seen once an epoch with weight N/|B|, which is SOURCE's expectation
    Σ_steps η ∇L. One segment per epoch, gradients where the epoch ends: equal to the unrolled reference to 1e-3
    (what is left is the weights' drift within an epoch)."""
    init, x, y, qx, qy = tiny_problem(n=40)
    recipe = TrainRecipe(epochs=3, batch_size=8, lr=1e-4, momentum=0.0, weight_decay=1e-2, schedule="constant")
    model, trajectory = record_trajectory(init, x, y, recipe, seed=5)
    task = Task(model, x, y, 3, trajectory=trajectory)
    unrolled = registry.get("unrolled")().fit(task).scores(qx, qy, x, y).double()
    source = registry.get("source")(segments=3, damping=0.0, pseudo_labels="all").fit(task)
    got = -(source.query_features(qx, qy) @ source.train_features(x, y).T)
    err = float((got - unrolled).abs().max() / unrolled.abs().max())
    assert err < 1e-3, err


# ---------------------------------------------------------------- end to end on a zoo

def test_source_and_unrolled_run_on_zoo_models_and_are_refused_elsewhere(tmp_path):
    """`--explain zoo` runs them (LDS only: the corrupted-label models keep no trajectory); the ground truth's
    models are refused with a line that says what to do; the campaign explains the zoo's models for them."""
    from benchmark.evaluate import campaign
    from benchmark.groundtruth import artifact as gt_artifact
    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor

    S = settings.get("synthetic-mlp")
    store = synthetic_store(tmp_path)
    quiet = dict(device="cpu", log=lambda *a: None)
    zoo_mod.build(S, zoo_mod.ZooSpec(models=1), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    source, unrolled = registry.get("source"), registry.get("unrolled")
    gt = gt_artifact.load(store, S)
    with pytest.raises(RunError, match="--explain zoo"):
        engine.evaluate_lds(gt, source, search=False, **quiet)
    with pytest.raises(RunError, match="holds only the corrupted-label model, not its checkpoints"):
        records.run(store, S, unrolled, tasks=["mislabel"], **quiet)
    rec = records.run(store, S, source, {"segments": 3}, explain="zoo", search=False, **quiet)
    assert set(rec) >= {"lds"} and "mislabel" not in rec  # the default tasks leave mislabel out
    assert rec["lds"]["explained"]["source"] == "zoo" and rec["lds"]["mean"] > 0.2
    assert [seg["checkpoint"] for seg in rec["lds"]["solver_info"][0]["segments"]] == [1, 2, 3]
    assert records.stale_reasons(rec, store, S, source) == {}
    done, failures = campaign.update(store, [S], [unrolled], **quiet)
    assert not failures and (S.name, "unrolled", ["lds"]) in done
    rec = records.read_record(store, S.name, "unrolled")
    assert rec["lds"]["explained"]["source"] == "zoo" and rec["lds"]["mean"] > 0.2
    assert rec["lds"]["solver_info"][0]["replay_max_relative_deviation"] == 0.0


def test_unroll_error_study_compares_scores_with_the_reference(tmp_path):
    """`tdabench unroll-error`: the reference agrees with itself exactly; SOURCE's rows cover its chosen
    configuration, every segment count up to one per epoch and the other gradient estimator; the CSV keeps the
    rows of other settings."""
    import pandas as pd

    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor
    from benchmark.studies import unroll_error

    S = settings.get("synthetic-mlp")
    store = synthetic_store(tmp_path)
    zoo_mod.build(S, zoo_mod.ZooSpec(models=1), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    # a CSV from before the reference column: its rows of other settings are kept, this setting's replaced
    unroll_error.csv_path(store).write_text(f"setting,solver\nother,kept\n{S.name},stale\n")
    df = unroll_error.run(store, S, registry.get("unrolled"), [registry.get("source"), registry.get("identity")],
                          queries=6, log=lambda *a: None)
    by = df[df["setting"] == S.name].set_index("solver")
    assert by.loc["unrolled", "pearson"] == pytest.approx(1.0) and by.loc["unrolled", "rel_error"] == 0.0
    assert {"source (chosen)", "source L=1", "source L=3", "source (chosen, gradients=mean)",
            "identity (chosen)"} <= set(by.index)
    assert by["pearson"].between(-1, 1).all() and (by["seconds"] > 0).all()
    assert by.loc["source L=3", "pearson"] > 0.5  # one segment per epoch tracks the unrolled run (0.8-0.9 measured)
    assert list(pd.read_csv(unroll_error.csv_path(store))["setting"]).count("other") == 1
    assert set(by["reference"]) == {"unrolled, all 3 epochs"} and (by["scale"] > 0).all()
    # a window of the last epoch: its own rows beside the full reference's, a smaller response (fewer steps)
    last = unroll_error.run(store, S, registry.get("unrolled"), [registry.get("identity")], queries=6,
                            reference_epochs=1, log=lambda *a: None)
    saved = pd.read_csv(unroll_error.csv_path(store))
    assert set(saved["reference"].dropna()) == {"unrolled, all 3 epochs", "unrolled, last 1 of 3 epochs"}
    assert "stale" not in set(saved["solver"]) and list(saved["solver"]).count("kept") == 1
    win = last[last["reference"] == "unrolled, last 1 of 3 epochs"].set_index("solver")
    assert win.loc["unrolled", "pearson"] == pytest.approx(1.0)
    assert win.loc["unrolled", "scale"] < by.loc["unrolled", "scale"]
    with pytest.raises(ValueError, match="between 1 and the run's 3 epochs"):
        unroll_error.run(store, S, registry.get("unrolled"), [], queries=6, reference_epochs=4, log=lambda *a: None)
