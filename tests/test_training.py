"""Training is a function of (setting, indices, seed); the vmap-batched trainer equals the plain loop."""

import dataclasses

import pytest
import torch

from benchmark.setup import settings
from benchmark.setup.training import evaluate, train, train_batched, worker_training


def _subset(n, size, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@pytest.mark.parametrize("name", ["synthetic-mlp", "synthetic-cnn"])
def test_same_seed_same_model(name):
    s = settings.get(name)
    d = s.data()
    idx = _subset(len(d.train_y), 128, 0)
    a = train(s.model(11), d.train_x, d.train_y, s.recipe, 11, idx).state_dict()
    b = train(s.model(11), d.train_x, d.train_y, s.recipe, 11, idx).state_dict()
    c = train(s.model(12), d.train_x, d.train_y, s.recipe, 12, idx).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["synthetic-mlp", "synthetic-cnn"])
def test_worker_training_moves_no_bit_on_a_cpu(name):
    """Workers train with torch's deterministic algorithms (repeatable GPU training); on a CPU that must not change
    a single bit, or the committed CPU ground truths would no longer be what the code computes. The caller's
    settings come back afterwards."""
    s = settings.get(name)
    d = s.data()
    idx = _subset(len(d.train_y), 128, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = train(s.model(7), d.train_x, d.train_y, s.recipe, 7, idx).state_dict()
    finally:
        torch.set_num_threads(threads)
    with worker_training(1):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        det = train(s.model(7), d.train_x, d.train_y, s.recipe, 7, idx).state_dict()
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    assert all(torch.equal(plain[k], det[k]) for k in plain)


@pytest.mark.parametrize("name", ["synthetic-mlp", "synthetic-cnn"])
def test_batched_equals_loop(name):
    s = settings.get(name)
    d = s.data()
    seeds = [3, 4, 5]
    idxs = [_subset(len(d.train_y), 128, k) for k in range(3)]
    states = train_batched([s.model(sd) for sd in seeds], d.train_x, d.train_y, s.recipe, seeds, idxs)
    for sd, idx, state in zip(seeds, idxs, states):
        ref = train(s.model(sd), d.train_x, d.train_y, s.recipe, sd, idx).state_dict()
        for k in ref:
            # Same arithmetic in a different summation order: agreement to float32 round-off.
            assert torch.allclose(state[k], ref[k], rtol=1e-4, atol=1e-5), (name, k, (state[k] - ref[k]).abs().max())


def test_batched_needs_equal_sizes():
    s = settings.get("synthetic-mlp")
    d = s.data()
    with pytest.raises(ValueError, match="equal-sized"):
        train_batched([s.model(0), s.model(1)], d.train_x, d.train_y, s.recipe, [0, 1],
                      [torch.arange(10), torch.arange(12)])


def test_training_learns_and_schedule_reaches_zero():
    s = settings.get("synthetic-mlp")
    d = s.data()
    before = evaluate(s.model(0), d.test_x, d.test_y)["correct"].float().mean()
    model = train(s.model(0), d.train_x, d.train_y, s.recipe, 0)
    after = evaluate(model, d.test_x, d.test_y)["correct"].float().mean()
    assert after > max(before, 1.5 / d.num_classes)
    # A constant schedule with lr -> lr changes the model: the schedule is really applied.
    const = train(s.model(0), d.train_x, d.train_y, dataclasses.replace(s.recipe, schedule="constant"), 0)
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(), const.parameters()))


def test_margin_and_loss_measurements():
    from benchmark.core.measurements import loss, margin

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    expect_margin = torch.tensor([2 - torch.logsumexp(torch.tensor([0.0, -1.0]), 0).item(),
                                  1 - torch.logsumexp(torch.tensor([0.0, 3.0]), 0).item()])
    assert torch.allclose(margin(logits, y), expect_margin)
    # Cross-entropy is softplus(-margin): a monotone function of the margin.
    assert torch.allclose(loss(logits, y), torch.nn.functional.softplus(-margin(logits, y)), atol=1e-6)


# ---------------------------------------------------------------- the optimiser's arithmetic

def _full_batch(s, wd, lr=0.5):
    """One epoch whose only batch is the whole training set: exactly one SGD step, at the full learning rate."""
    d = s.data()
    return d, dataclasses.replace(s.recipe, epochs=1, batch_size=len(d.train_y), lr=lr, weight_decay=wd)


def _one_step_by_hand(model, x, y, lr, wd):
    """θ − lr·(∇L(θ) + wd·θ): SGD's first step, where the momentum buffer is the gradient itself."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {name: (p - lr * (g + wd * p)).detach() for (name, p), g in zip(model.named_parameters(), grads)}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_full_batch_step_of_each_trainer_is_sgd_with_weight_decay(wd):
    s = settings.get("synthetic-mlp")
    d, recipe = _full_batch(s, wd)
    want = _one_step_by_hand(s.model(5), d.train_x, d.train_y, recipe.lr, wd)
    loop = dict(train(s.model(5), d.train_x, d.train_y, recipe, 5).named_parameters())
    batched = train_batched([s.model(5), s.model(6)], d.train_x, d.train_y, recipe, [5, 6],
                            [torch.arange(len(d.train_y))] * 2)[0]
    for name, expect in want.items():
        # the decay term moves θ by lr·wd·|θ| ≈ 0.05·|θ|: far beyond the float32 round-off allowed here
        torch.testing.assert_close(loop[name].detach(), expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[name], expect, rtol=1e-5, atol=1e-6)


def test_larger_weight_decay_gives_smaller_weights():
    s = settings.get("synthetic-mlp")
    d = s.data()
    norms = {}
    for wd in (0.0, 0.05):
        recipe = dataclasses.replace(s.recipe, weight_decay=wd)
        loop = train(s.model(0), d.train_x, d.train_y, recipe, 0).parameters()
        batched = train_batched([s.model(0)], d.train_x, d.train_y, recipe, [0], [torch.arange(len(d.train_y))])[0]
        norms[wd] = (torch.cat([p.detach().flatten() for p in loop]).norm(),
                     torch.cat([v.flatten() for k, v in batched.items()]).norm())
    assert norms[0.05][0] < 0.95 * norms[0.0][0] and norms[0.05][1] < 0.95 * norms[0.0][1], norms


# ---------------------------------------------------------------- data order

def _inputs_seen(s, seed, indices):
    """The training inputs ``train`` feeds the model, batch by batch, from one fixed initialisation."""
    d = s.data()
    seen = []
    model = s.model(0)  # the same initialisation for every seed: only the data order can differ
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    train(model, d.train_x, d.train_y, s.recipe, seed, indices)
    return seen


def test_replicas_of_one_subset_see_different_data_orders_under_shared_seeds():
    """Under the shared policy, replica r's subset models share one seed; replicas 0 and 1 of the same subset
    must still train on different data orders (the seed replicas are what the noise ceiling measures)."""
    from benchmark.groundtruth.protocol import subset_indices
    from benchmark.setup.config import Protocol, Unit, unit_seed

    s = settings.get("synthetic-mlp")
    protocol = Protocol(subsets=3, seeds=2, seed_policy="shared")
    idx = torch.from_numpy(subset_indices(protocol, len(s.data().train_y), 2))
    orders = [_inputs_seen(s, unit_seed(protocol, Unit(r, 2)), idx) for r in (0, 1)]
    assert len(orders[0]) == len(orders[1]) == s.recipe.epochs * -(-len(idx) // s.recipe.batch_size)
    # the subset's examples every epoch (their sum), in another order
    per_epoch = len(orders[0]) // s.recipe.epochs
    subset_sum = s.data().train_x[idx].double().sum(0)
    for o in orders:
        for e in range(s.recipe.epochs):
            torch.testing.assert_close(torch.cat(o[e * per_epoch:(e + 1) * per_epoch]).double().sum(0), subset_sum)
    assert not all(torch.equal(a, b) for a, b in zip(*orders))
    # and the order is a function of the seed: the same unit sees the same order again
    again = _inputs_seen(s, unit_seed(protocol, Unit(1, 2)), idx)
    assert all(torch.equal(a, b) for a, b in zip(orders[1], again))
    # the vmap trainer consumes the same orders: from one initialisation, the two replicas end apart
    d = s.data()
    states = train_batched([s.model(0), s.model(0)], d.train_x, d.train_y, s.recipe,
                           [unit_seed(protocol, Unit(r, 2)) for r in (0, 1)], [idx, idx])
    assert any(not torch.allclose(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("drop_last", [False, True])
def test_steps_and_learning_rates_of_every_epoch(drop_last):
    """100 examples in batches of 32: 4 steps an epoch (the last one of 4 examples), or 3 with drop_last; the
    linear schedule takes step t of T at lr·(1 − t/T) and reaches 0 after the last step, the constant one stays."""
    s = settings.get("synthetic-mlp")
    d = s.data()
    idx = torch.arange(100)
    steps = 3 if drop_last else 4
    for schedule in ("linear", "constant"):
        recipe = dataclasses.replace(s.recipe, epochs=2, batch_size=32, lr=0.2, schedule=schedule, drop_last=drop_last)
        seen, batches = [], []
        model = s.model(0)
        model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
        train(model, d.train_x, d.train_y, recipe, 0, idx, on_epoch=lambda e, m, rates: seen.append((e, list(rates))))
        total = 2 * steps
        want = [0.2 * (1 - t / total) if schedule == "linear" else 0.2 for t in range(total)]
        assert [e for e, _ in seen] == [0, 1, 2] and seen[0][1] == []
        assert seen[1][1] + seen[2][1] == pytest.approx(want, rel=1e-12)
        assert batches == ([32, 32, 32] if drop_last else [32, 32, 32, 4]) * 2


def test_evaluate_is_margin_loss_and_correctness_in_any_chunk():
    from benchmark.core.measurements import margin

    s = settings.get("synthetic-mlp")
    d = s.data()
    model = train(s.model(0), d.train_x, d.train_y, s.recipe, 0)
    with torch.no_grad():
        logits = model(d.test_x)
    want = {"margin": margin(logits, d.test_y), "correct": logits.argmax(-1) == d.test_y,
            "loss": torch.nn.functional.cross_entropy(logits, d.test_y, reduction="none")}
    for chunk in (7, 4096):
        got = evaluate(model, d.test_x, d.test_y, chunk=chunk)
        assert got["correct"].dtype == torch.bool and torch.equal(got["correct"], want["correct"])
        for k in ("margin", "loss"):
            assert got[k].dtype == torch.float32 and got[k].shape == (len(d.test_y),)
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- edge cases of the inputs

def test_one_example_is_one_sgd_step_an_epoch_and_no_example_is_an_error():
    # a single example is a valid training set (one full batch of one); an empty one has nothing to train on
    s = settings.get("synthetic-mlp")
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=1, lr=0.5, weight_decay=0.1)
    idx = torch.tensor([17])
    want = _one_step_by_hand(s.model(5), d.train_x[idx], d.train_y[idx], recipe.lr, recipe.weight_decay)
    got = dict(train(s.model(5), d.train_x, d.train_y, recipe, 5, idx).named_parameters())
    for name, expect in want.items():
        torch.testing.assert_close(got[name].detach(), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        train(s.model(5), d.train_x, d.train_y, recipe, 5, torch.arange(0))


def test_batched_needs_as_many_seeds_and_index_sets_as_models():
    s = settings.get("synthetic-mlp")
    d = s.data()
    idx = torch.arange(10)
    for models, seeds, indices in (([s.model(0), s.model(1)], [0, 1, 2], [idx, idx]),
                                   ([s.model(0), s.model(1)], [0, 1], [idx, idx, idx]),
                                   ([], [], [])):
        with pytest.raises(ValueError, match="equal length"):
            train_batched(models, d.train_x, d.train_y, s.recipe, seeds, indices)


def test_every_64_bit_seed_trains_and_both_trainers_agree_at_the_ends_of_the_range():
    # torch seeds generators with -2**63 .. 2**64-1; the data-order stream is the seed shifted by an offset, which
    # must stay in that range for every seed a caller may pass (seeds near either end included)
    s = settings.get("synthetic-mlp")
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=1)
    idx = torch.arange(64)
    for seed in (2**64 - 1, -(2**63)):
        loop = train(s.model(0), d.train_x, d.train_y, recipe, seed, idx).state_dict()
        batched = train_batched([s.model(0)], d.train_x, d.train_y, recipe, [seed], [idx])[0]
        for k in loop:
            torch.testing.assert_close(batched[k], loop[k], rtol=1e-4, atol=1e-5)


def test_both_trainers_train_on_the_device_of_the_data():
    # "meta" stands in for a GPU on the CPU-only test machines: models built on the CPU must move to the data
    s = settings.get("synthetic-mlp")
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=1)
    x, y = d.train_x[:40].to("meta"), d.train_y[:40].to("meta")
    model = train(s.model(0), x, y, recipe, 0)
    assert all(p.device.type == "meta" for p in model.parameters())
    states = train_batched([s.model(0), s.model(1)], x, y, recipe, [0, 1], [torch.arange(40)] * 2)
    assert all(v.device.type == "meta" for state in states for v in state.values())


def test_channels_last_for_image_batches_is_a_speed_choice_that_changes_no_model(monkeypatch):
    # _memory_format picks channels_last for 4-D inputs only because it is faster; the same CNN trained with the
    # default (contiguous) layout must come out the same up to float32 round-off
    from benchmark.setup import training

    s = settings.get("synthetic-cnn")
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=1)
    idx = _subset(len(d.train_y), 96, 0)
    fast = train(s.model(3), d.train_x, d.train_y, recipe, 3, idx).state_dict()
    monkeypatch.setattr(training, "_memory_format", lambda x: torch.contiguous_format)
    plain = train(s.model(3), d.train_x, d.train_y, recipe, 3, idx).state_dict()
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- choosing the trainer

def _clocked_trainers(monkeypatch, loop_s, vmap_s):
    """A clock that only the trainers move: every model of the plain loop costs ``loop_s`` seconds, every model of
    a vmap batch ``vmap_s``. Both trainers still run for real; their calls are recorded as
    (trainer, x, y, epochs, seeds, the indices actually trained on)."""
    import time

    from benchmark.setup import training

    clock, calls = [0.0], []
    real_train, real_batched = training.train, training.train_batched

    def loop(model, x, y, recipe, seed, indices=None, **kw):
        calls.append(("loop", x, y, recipe, [seed], [torch.arange(len(y)) if indices is None else indices]))
        out = real_train(model, x, y, recipe, seed, indices, **kw)
        clock[0] += loop_s
        return out

    def batched(models, x, y, recipe, seeds, indices):
        calls.append(("vmap", x, y, recipe, list(seeds), list(indices)))
        out = real_batched(models, x, y, recipe, seeds, indices)
        clock[0] += vmap_s * len(models)
        return out

    monkeypatch.setattr(training, "train", loop)
    monkeypatch.setattr(training, "train_batched", batched)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    return calls


def test_choose_trainer_needs_no_timing_for_one_model_or_a_gpu(monkeypatch):
    from benchmark.setup.training import choose_trainer

    s = settings.get("synthetic-mlp")
    calls = _clocked_trainers(monkeypatch, 1.0, 1.0)
    assert choose_trainer(s, torch.device("cpu"), 1) == ("loop", {})  # nothing to batch
    assert choose_trainer(s, torch.device("cuda"), 50) == ("vmap", {})  # vmap always wins on a GPU
    assert calls == []


@pytest.mark.parametrize("loop_s,vmap_s,want", [(0.5, 0.125, "vmap"), (0.25, 0.75, "loop")])
def test_choose_trainer_picks_the_faster_trainer_per_model_on_equal_work(monkeypatch, loop_s, vmap_s, want):
    # the seconds reported are per model (a batch of vmap models costs vmap_s each), for any number of timed models;
    # the two trainers are timed on the same work: the same seeds, the first steps*batch_size examples, one epoch
    from benchmark.setup.training import choose_trainer

    s = settings.get("synthetic-mlp")
    d = s.data()
    for kw in ({}, {"models": 3, "steps": 2}):
        calls = _clocked_trainers(monkeypatch, loop_s, vmap_s)
        choice, timing = choose_trainer(s, torch.device("cpu"), 10, **kw)
        assert choice == want
        assert timing == {"loop_s_per_model": loop_s, "vmap_s_per_model": vmap_s}
        n = min(len(d.train_y), kw.get("steps", 4) * s.recipe.batch_size)
        assert n < len(d.train_y) and [c[0] for c in calls][-1] == "vmap"
        loops, vmap = [c for c in calls if c[0] == "loop"], calls[-1]
        assert [sd for c in loops[-len(vmap[4]):] for sd in c[4]] == vmap[4]
        if "models" in kw:
            assert len(vmap[4]) == kw["models"]
        for trainer, x, y, recipe, seeds, indices in calls:
            assert recipe == dataclasses.replace(s.recipe, epochs=1)
            assert torch.equal(x, d.train_x[:n]) and torch.equal(y, d.train_y[:n])
            assert all(torch.equal(i, torch.arange(n)) for i in indices)
