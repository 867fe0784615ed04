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
