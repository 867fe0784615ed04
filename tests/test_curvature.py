"""Numerical truths of the shared curvature math (benchmark/curvature.py), each checked against an
independent construction: plain autograd loops, explicit Jacobians, torch.autograd.functional.hessian.

Everything runs in float64 on models with a few hundred parameters, so agreement is to ~1e-10.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from benchmark import core as cv
from benchmark.core import SolverError
from benchmark.core.measurements import MEASUREMENTS

TOL = dict(rtol=1e-9, atol=1e-11)


def tiny_mlp(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, classes)).double().eval()


def tiny_cnn(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, stride=1, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * 2 * 2, classes),
    ).double().eval()


def data(n=20, shape=(1, 6, 6), classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


MODELS = {"mlp": (tiny_mlp, (1, 3, 4)), "cnn": (tiny_cnn, (1, 6, 6))}


def flat_grad(model, scalar):
    model.zero_grad()
    scalar.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def explicit_ggn(model, x):
    """Σ JᵢᵀHᵢJᵢ / N with Jᵢ from torch.autograd.functional.jacobian, one example at a time."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    total = 0
    for xi in x:
        def logits(*ps):
            return torch.func.functional_call(model, dict(zip(names, ps)), (xi[None],))[0]

        J = torch.cat([j.reshape(j.shape[0], -1) for j in torch.autograd.functional.jacobian(logits, params)], 1)
        p = torch.softmax(logits(*params), -1)
        total = total + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return total / len(x)


# ---------------------------------------------------------------- layout

def test_layout_roundtrip_and_order():
    model = tiny_cnn()
    fm = cv.FunctionalModel(model)
    theta = fm.theta()
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    V = torch.randn(3, fm.numel, dtype=torch.float64)
    assert torch.equal(fm.layout.flatten(fm.layout.unflatten(V), batch_dims=1), V)
    assert fm.layout.numel == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="parameters"):
        fm.layout.unflatten(torch.zeros(fm.numel + 1))


# ---------------------------------------------------------------- per-example gradients

@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_per_sample_grads_match_autograd_loop(arch, measurement):
    build, shape = MODELS[arch]
    model = build()
    x, y = data(9, shape)
    fm = cv.FunctionalModel(model)
    got = cv.per_sample_grads(fm, x, y, measurement, chunk=4)
    fn = MEASUREMENTS[measurement]
    want = torch.stack([flat_grad(model, fn(model(x[i:i + 1]), y[i:i + 1]).sum()) for i in range(len(y))])
    torch.testing.assert_close(got, want, **TOL)


def test_float64_copy_leaves_model_untouched():
    model = tiny_mlp().float()
    fm = cv.FunctionalModel(model, "float64")
    assert fm.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    x, y = data(5, (1, 3, 4))
    g64 = cv.per_sample_grads(fm, x.float(), y)
    g32 = cv.per_sample_grads(cv.FunctionalModel(model), x.float(), y)
    assert g64.dtype == torch.float64
    torch.testing.assert_close(g64.float(), g32, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- logit Hessian

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(0, 2**31 - 1), st.floats(0.1, 20.0))
def test_logit_hessian_factor(classes, seed, scale):
    z = torch.randn(3, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    L = cv.logit_hessian_factor(z)
    H = cv.logit_hessian(z)
    torch.testing.assert_close(L @ L.transpose(-1, -2), H, rtol=1e-10, atol=1e-14)
    y = torch.zeros(3, dtype=torch.long)
    for i in range(3):  # and H is the cross-entropy Hessian in the logits, whatever the label
        h = torch.autograd.functional.hessian(lambda zi: F.cross_entropy(zi[None], y[i:i + 1]), z[i])
        torch.testing.assert_close(H[i], h, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- Gauss-Newton and Hessian

@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dense_ggn_matches_explicit_jacobians(arch):
    build, shape = MODELS[arch]
    model = build()
    x, _ = data(12, shape)
    G = cv.dense_ggn(cv.FunctionalModel(model), x, batch_size=5)
    torch.testing.assert_close(G, explicit_ggn(model, x), **TOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD by construction


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_ggn_vector_product_matches_dense(arch):
    build, shape = MODELS[arch]
    model = build()
    x, _ = data(15, shape)
    fm = cv.FunctionalModel(model)
    G = cv.dense_ggn(fm, x)
    V = torch.randn(4, fm.numel, dtype=torch.float64)
    torch.testing.assert_close(cv.ggn_vector_product(fm, V, x, batch_size=4), V @ G, **TOL)


def test_dense_ggn_in_blocks_on_a_larger_model():
    """Above 1024 parameters G is multiplied block-triangle by block-triangle and mirrored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 15), nn.Tanh(), nn.Linear(15, 10)).double()
    x = torch.randn(30, 100, dtype=torch.float64)
    fm = cv.FunctionalModel(model)
    assert fm.numel // 512 >= 3
    G = cv.dense_ggn(fm, x, batch_size=8)
    assert torch.equal(G, G.T)
    V = torch.randn(3, fm.numel, dtype=torch.float64)
    torch.testing.assert_close(V @ G, cv.ggn_vector_product(fm, V, x), **TOL)


def test_hessian_matches_autograd_and_equals_ggn_for_linear_logits():
    model = tiny_mlp()
    x, y = data(10, (1, 3, 4))
    fm = cv.FunctionalModel(model)

    def mean_loss(theta):
        return F.cross_entropy(torch.func.functional_call(model, fm.layout.unflatten(theta), (x,)), y)

    H = cv.dense_hessian(fm, x, y, batch_size=3, chunk_size=50)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(mean_loss, fm.theta()), **TOL)
    V = torch.randn(3, fm.numel, dtype=torch.float64)
    torch.testing.assert_close(cv.hessian_vector_product(fm, V, x, y), V @ H, **TOL)
    # the MLP's Hessian differs from its GGN (tanh curvature)...
    assert (H - cv.dense_ggn(fm, x)).abs().max() > 1e-6
    lr = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()  # ...logistic regression's does not
    flr = cv.FunctionalModel(lr)
    torch.testing.assert_close(cv.dense_hessian(flr, x, y), cv.dense_ggn(flr, x), **TOL)


def test_top_eigenvalue_power_iteration():
    model = tiny_mlp()
    x, _ = data(30, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    G = cv.dense_ggn(fm, x)
    top = cv.top_eigenvalue(lambda v: cv.ggn_vector_product(fm, v, x), fm.numel, iters=300,
                            generator=torch.Generator().manual_seed(0))
    assert top == pytest.approx(float(torch.linalg.eigvalsh(G).max()), rel=1e-6)


# ---------------------------------------------------------------- Kronecker factors

def layer_positions(layer, layout):
    """(out, D) integer positions of the layer's [W | b] entries in the flat parameter vector."""
    pos = layout.unflatten(torch.arange(layout.numel, dtype=torch.float64).unsqueeze(0))
    return layer.to_matrix(pos).squeeze(0).round().long()


def test_layer_pseudo_grads_reconstruct_per_sample_grads():
    """Σ_t dy_t ã_tᵀ with the true-label cotangent is each example's loss gradient: checks the unfold
    order, stride/padding, the bias column and the mapping back to the flat layout."""
    model = tiny_cnn()
    x, y = data(7)
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    assert [layer.bias is not None for layer in layers] == [True, False, True]

    def ce_logit_grad(z):
        return (torch.softmax(z, -1) - F.one_hot(y, z.shape[-1]).double()).unsqueeze(0)

    grads = cv.layer_pseudo_grads(fm, layers, x, ce_logit_grad)
    want = cv.per_sample_grads(fm, x, y, "loss")
    got = torch.zeros_like(want)
    for layer in layers:
        a, dy = grads[layer.path]
        got[:, layer_positions(layer, fm.layout).flatten()] = torch.einsum("nto,ntd->nod", dy[0], a).reshape(len(y), -1)
    torch.testing.assert_close(got, want, **TOL)


def kron_block(A, Y):
    """A ⊗ Y arranged on row-major (out, D) matrix entries: entry ((o,d),(o',d')) = Y[o,o'] A[d,d']."""
    return torch.einsum("ab,de->adbe", Y, A).reshape(Y.shape[0] * A.shape[0], -1)


def test_kfac_exact_for_one_linear_layer_and_one_example():
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    x, _ = data(1, (5,), classes=3)
    fm = cv.FunctionalModel(model)
    layer, = cv.kron_layers(model)
    (A, Y), = cv.kronecker_factors(fm, [layer], x, "all").values()
    idx = layer_positions(layer, fm.layout).flatten()
    G = cv.dense_ggn(fm, x)
    torch.testing.assert_close(kron_block(A, Y), G[idx][:, idx], **TOL)


def test_kfac_exact_when_every_example_has_the_same_logit_hessian():
    """W = 0: every example has p = softmax(b), so G = E[ããᵀ] ⊗ H exactly, for any number of examples."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.3, -1.0, 0.5]))
    x, _ = data(40, (5,), classes=3)
    fm = cv.FunctionalModel(model)
    layer, = cv.kron_layers(model)
    (A, Y), = cv.kronecker_factors(fm, [layer], x, "all", batch_size=16).values()
    idx = layer_positions(layer, fm.layout).flatten()
    torch.testing.assert_close(kron_block(A, Y), cv.dense_ggn(fm, x)[idx][:, idx], **TOL)


def test_sampled_pseudo_labels_are_unbiased():
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    x, _ = data(30, (5,), classes=3)
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    (_, Y_all), = cv.kronecker_factors(fm, layers, x, "all").values()
    Y_mean = sum(cv.kronecker_factors(fm, layers, x, "sampled", seed=s)[layers[0].path][1] for s in range(300)) / 300
    torch.testing.assert_close(Y_mean, Y_all, rtol=0, atol=0.05 * float(Y_all.abs().max()))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis(arch):
    """With every label, EK-FAC's refitted Λ equals diag(Qᵀ G_l Q) for each layer's block G_l of the
    dense GGN, Q = Q_A ⊗ Q_Y — for convolutions too (positions summed inside each example)."""
    build, shape = MODELS[arch]
    model = build()
    x, _ = data(11, shape)
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    bases = cv.kronecker_eigenbases(fm, layers, x, "all", batch_size=4)
    lam = cv.ekfac_eigenvalues(fm, layers, x, bases, "all", batch_size=3)
    G = cv.dense_ggn(fm, x)
    for layer in layers:
        idx = layer_positions(layer, fm.layout).flatten()
        Q = kron_block(bases[layer.path]["q_a"], bases[layer.path]["q_y"])  # columns: basis matrices q_y qₐᵀ
        want = torch.einsum("pi,pq,qi->i", Q, G[idx][:, idx], Q).reshape(layer.out_dim, layer.in_dim)
        torch.testing.assert_close(lam[layer.path], want, **TOL)


class Tokens(nn.Module):
    """Free parameters owned by a container (like a ViT's cls_token / pos_embed), then norms and linears."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(12))
        self.body = nn.Sequential(nn.Linear(12, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                                  nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x):
        return self.body(x.flatten(1) + self.shift)


def test_kfac_holds_unfactorable_parameters_constant_and_fits_the_subblock():
    """With norms and free tokens excluded, the Kronecker layers are exactly the attributed ones, and EK-FAC's
    refitted eigenvalues equal diag(Qᵀ G_l Q) for the block G_l of the *full* model's GGN (explicit Jacobians):
    holding parameters constant must select the right sub-block, not change the curvature."""
    torch.manual_seed(0)
    model = Tokens().double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.body[4].running_mean.normal_()
        model.body[4].running_var.uniform_(0.5, 2.0)
    x, _ = data(9, (1, 3, 4))
    layers, excluded = cv.kron_layers_and_exclusions(model, unsupported="exclude")
    assert [layer.path for layer in layers] == ["body.0", "body.3", "body.6"]
    assert sorted(excluded) == ["body.1.bias", "body.1.weight", "body.4.bias", "body.4.weight", "shift"]
    assert "normalisation layer (LayerNorm)" == excluded["body.1.weight"] and "Tokens" in excluded["shift"]
    with pytest.raises(SolverError, match="cannot be factored: shift.*unsupported_layers='exclude'"):
        cv.kron_layers(model)

    names = [n for layer in layers for n in (layer.weight, layer.bias)]
    fm = cv.FunctionalModel(model, attributed=names)
    assert fm.numel == sum(p.numel() for n, p in model.named_parameters() if n in names)
    torch.testing.assert_close(fm.logits(x), model(x), **TOL)  # the constants still take part
    bases = cv.kronecker_eigenbases(fm, layers, x, "all")
    lam = cv.ekfac_eigenvalues(fm, layers, x, bases, "all")
    full = cv.FunctionalModel(model)
    G = explicit_ggn(model, x)
    for layer in layers:
        idx = layer_positions(layer, full.layout).flatten()
        Q = kron_block(bases[layer.path]["q_a"], bases[layer.path]["q_y"])
        want = torch.einsum("pi,pq,qi->i", Q, G[idx][:, idx], Q).reshape(layer.out_dim, layer.in_dim)
        torch.testing.assert_close(lam[layer.path], want, **TOL)


class Staged(nn.Module):
    """The shape of a timm ResNet: a stem, stages of blocks (one with a nested downsample), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.stage1 = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.stage2 = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.stage2(self.stage1(self.stem(x)))))


def test_last_blocks_selects_the_last_blocks_and_the_head():
    model = Staged()
    assert cv.model_blocks(model) == ["stage1.0", "stage1.1", "stage2.0"]
    names, record = cv.last_blocks_parameters(model, 2)
    assert names == ["stage1.1.weight", "stage1.1.bias", "stage2.0.0.weight", "stage2.0.0.bias",
                     "stage2.0.1.0.weight", "stage2.0.1.0.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert record == {"last_blocks": 2, "of_blocks": 3, "blocks": ["stage1.1", "stage2.0"],
                      "head": ["norm.weight", "norm.bias", "head.weight", "head.bias"]}
    with pytest.raises(SolverError, match="last_blocks=4, but the model has 3 blocks"):
        cv.last_blocks_parameters(model, 4)
    with pytest.raises(SolverError, match="positive integer"):
        cv.last_blocks_parameters(model, 0)
    # a plain nn.Sequential: its parameterised layers are the blocks; a wrapper is looked through
    assert cv.model_blocks(tiny_cnn()) == ["0", "3", "6"]
    assert cv.model_blocks(nn.Sequential(nn.Identity(), Staged())) == ["1.stage1.0", "1.stage1.1", "1.stage2.0"]


def test_kron_apply_inverts_the_kronecker_product(monkeypatch):
    model = tiny_cnn()
    x, _ = data(9)
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    bases = cv.kronecker_eigenbases(fm, layers, x, "all")
    lam = {p: b["lam_y"][:, None] * b["lam_a"][None, :] for p, b in bases.items()}
    scale = cv.damped_eigenvalues(lam, 0.1, "test")
    V = torch.randn(5, fm.numel, dtype=torch.float64)
    R = cv.kron_apply(layers, fm.layout, V, bases, scale)
    monkeypatch.setattr(cv.kronecker, "KRON_ROWS", 2)  # rows applied in blocks of 2, 2, 1: the same rows
    torch.testing.assert_close(cv.kron_apply(layers, fm.layout, V, bases, scale), R, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cv.kron_apply(layers, fm.layout, V.float(), bases, scale), R.float())  # dtype kept
    factors = cv.kronecker_factors(fm, layers, x, "all")
    for layer in layers:  # (A ⊗ Y + λI) R = V, layer by layer, as matrices: Y R A + λR = V
        A, Y = factors[layer.path]
        Rm = layer.to_matrix(fm.layout.unflatten(R))
        torch.testing.assert_close(Y @ Rm @ A + 0.1 * Rm, layer.to_matrix(fm.layout.unflatten(V)), **TOL)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "only nn.Linear and nn.Conv2d"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()), "groups=1"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten()), "explicit integer padding"),
    (nn.Sequential(nn.Embedding(5, 3)), "only nn.Linear and nn.Conv2d"),
])
def test_unsupported_layers_are_a_clear_error(model, match):
    with pytest.raises(SolverError, match=match):
        cv.kron_layers(model)


def test_shared_layer_is_a_clear_error():
    model = Shared().double()
    fm = cv.FunctionalModel(model)
    with pytest.raises(SolverError, match="more than once"):
        cv.kronecker_factors(fm, cv.kron_layers(model), torch.randn(3, 4, dtype=torch.float64))


# ---------------------------------------------------------------- errors and cache

def test_check_finite_names_the_example():
    t = torch.zeros(5, 3)
    t[3, 1] = float("nan")
    with pytest.raises(SolverError, match="non-finite train gradient for example 13"):
        cv.check_finite(t, "train gradient", offset=10)
    cv.check_finite(torch.zeros(2, 2), "fine")
    big = torch.zeros(600, 2)  # checked 256 rows at a time: a bad row in the last block is found too
    big[599, 0] = float("inf")
    with pytest.raises(SolverError, match="for example 599"):
        cv.check_finite(big, "train gradient")
    cv.check_finite(torch.zeros(0, 3), "empty")
    with pytest.raises(SolverError, match="1 NaN/Inf"):
        cv.check_finite(torch.tensor(float("nan")), "scalar", offset=None)


def test_cache_builds_once_and_evicts_by_bytes():
    cache = cv.CurvatureCache(max_bytes=3 * 8 * 100)
    calls = []

    def build(tag):
        calls.append(tag)
        return torch.zeros(100, dtype=torch.float64)

    v1, _, built1 = cache.get(("a",), lambda: build("a"))
    v2, _, built2 = cache.get(("a",), lambda: build("a"))
    assert built1 and not built2 and v1 is v2 and calls == ["a"]
    for k in "bcd":
        cache.get((k,), lambda k=k: build(k))
    _, _, rebuilt = cache.get(("a",), lambda: build("a"))  # evicted: four 800-byte entries exceed 2400 bytes
    assert rebuilt and calls == ["a", "b", "c", "d", "a"]


def test_fingerprint_tracks_content():
    model = tiny_mlp()
    x, y = data(4, (1, 3, 4))
    f0 = cv.fingerprint(model, x, y)
    assert cv.fingerprint(model, x, y) == f0
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-9
    assert cv.fingerprint(model, x, y) != f0


# ---------------------------------------------------------------- defaults, dispatch and edge cases

class GainLinear(nn.Linear):
    """A Linear with an extra parameter K-FAC has no factor for."""

    def __init__(self, *a):
        super().__init__(*a)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.gain


def test_extra_parameter_reason_names_only_the_extra_ones():
    # the reason lists exactly the parameters beyond weight and bias
    model = nn.Sequential(GainLinear(4, 3), nn.Linear(3, 2))
    layers, excluded = cv.kron_layers_and_exclusions(model, unsupported="exclude")
    assert [layer.path for layer in layers] == ["1"]
    assert excluded == {f"0.{n}": "GainLinear with extra parameters ['gain']" for n in ("weight", "bias", "gain")}


def test_unsupported_default_is_error_and_message_lists_at_most_four():
    # default unsupported="error"; the message joins up to four "name: why" with "; " and counts the rest
    model = nn.Sequential(GainLinear(4, 3), nn.Linear(3, 2))  # 3 excluded parameters
    with pytest.raises(SolverError) as e:
        cv.kron_layers_and_exclusions(model)
    why = "GainLinear with extra parameters ['gain']"
    assert f"cannot be factored: 0.weight: {why}; 0.bias: {why}; 0.gain: {why}. Exclude" in str(e.value)
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 2))  # 6 excluded
    with pytest.raises(SolverError) as e:
        cv.kron_layers(model)
    msg = str(e.value)
    assert "0.weight: normalisation layer (LayerNorm); 0.bias: normalisation layer (LayerNorm); 1.weight" in msg
    assert "1.bias: normalisation layer (LayerNorm) (and 2 more). Exclude" in msg and "2.weight" not in msg


def test_kron_partition_respects_within():
    # only the parameters in `within` are partitioned; a bias alone is excluded with its reason
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    layers, excluded = cv.kron_partition(model, within=["0.weight", "2.bias"])
    assert [(layer.path, layer.weight, layer.bias) for layer in layers] == [("0", "0.weight", None)]
    assert excluded == {"2.bias": "a bias without its weight (the layer is only partly attributed)"}


def test_kronecker_defaults_are_every_label():
    # pseudo_labels defaults to "all" in kronecker_factors, kronecker_eigenbases and ekfac_eigenvalues
    model = tiny_mlp()
    x, _ = data(5, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    f_all, f_def = cv.kronecker_factors(fm, layers, x, "all"), cv.kronecker_factors(fm, layers, x)
    b_all, b_def = cv.kronecker_eigenbases(fm, layers, x, "all"), cv.kronecker_eigenbases(fm, layers, x)
    l_all, l_def = cv.ekfac_eigenvalues(fm, layers, x, b_all, "all"), cv.ekfac_eigenvalues(fm, layers, x, b_all)
    for layer in layers:
        p = layer.path
        torch.testing.assert_close(f_def[p], f_all[p], rtol=0, atol=0)
        torch.testing.assert_close(b_def[p]["lam_a"], b_all[p]["lam_a"], rtol=0, atol=0)
        torch.testing.assert_close(l_def[p], l_all[p], rtol=0, atol=0)


def test_kronecker_factor_nan_names_the_layer():
    # a NaN input makes the factors non-finite; the error names the layer
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    x, _ = data(3, (5,), classes=3)
    x[1, 2] = float("nan")
    fm = cv.FunctionalModel(model)
    with pytest.raises(SolverError, match="non-finite Kronecker factor of layer '1'"):
        cv.kronecker_factors(fm, cv.kron_layers(model), x)


def test_dilated_conv_patches_reconstruct_per_sample_grads():
    # with dilation, Σ_t dy_t ã_tᵀ (true-label cotangent) is still each example's loss gradient
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2, dilation=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 7 * 7, 3)).double()
    x, y = data(4, (1, 7, 7), classes=3)
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    grads = cv.layer_pseudo_grads(fm, layers, x, lambda z: (torch.softmax(z, -1) - F.one_hot(y, 3).double())[None])
    want = cv.per_sample_grads(fm, x, y, "loss")
    got = torch.zeros_like(want)
    for layer in layers:
        a, dy = grads[layer.path]
        got[:, layer_positions(layer, fm.layout).flatten()] = torch.einsum("nto,ntd->nod", dy[0], a).reshape(4, -1)
    torch.testing.assert_close(got, want, **TOL)


def test_curvature_dispatch_matches_the_products():
    # curvature="ggn" (default) / "hessian" dispatch to the GGN / Hessian products; anything else is an error
    model = tiny_mlp()
    x, y = data(6, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    V = torch.randn(2, fm.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cv.curvature_vector_product(fm, V, x, y), cv.ggn_vector_product(fm, V, x), **TOL)
    torch.testing.assert_close(cv.curvature_vector_product(fm, V, x, y, "hessian"),
                               cv.hessian_vector_product(fm, V, x, y), **TOL)
    torch.testing.assert_close(cv.dense_curvature(fm, x, y), cv.dense_ggn(fm, x), **TOL)
    for fn in (lambda: cv.curvature_vector_product(fm, V, x, y, "fisher"), lambda: cv.dense_curvature(fm, x, y, "fisher")):
        with pytest.raises(SolverError, match="curvature must be"):
            fn()


def test_dense_ggn_nan_names_the_example_in_a_later_batch():
    # the offending example is numbered in the whole data set, not within its batch
    model = tiny_mlp()
    x, _ = data(9, (1, 3, 4))
    x[7, 0, 1, 1] = float("nan")
    with pytest.raises(SolverError, match="logit Jacobian for example 7 "):
        cv.dense_ggn(cv.FunctionalModel(model), x, batch_size=5)


def test_top_eigenvalue_is_reproducible_from_its_generator_and_zero_iterations():
    # the start vector comes from `generator` alone (not the global RNG); no iteration estimates 0.0
    M = torch.diag(torch.tensor([3.0, 2.9, 1.0], dtype=torch.float64))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(cv.top_eigenvalue(lambda v: v @ M, 3, iters=2, generator=torch.Generator().manual_seed(0)))
    assert runs[0] == runs[1] and runs[0] < 3.0
    assert cv.top_eigenvalue(lambda v: v @ M, 3, iters=0) == 0.0


def test_loss_gradient_sum_is_the_summed_per_example_gradient_in_any_chunk():
    # against autograd one example at a time; chunks of 1, of sizes that divide nothing, and the default (one chunk)
    model = tiny_mlp()
    x, y = data(7, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    want = sum(flat_grad(model, F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])) for i in range(len(y)))
    for kw in ({}, {"chunk": 1}, {"chunk": 3}, {"chunk": 4}):
        got = cv.loss_gradient_sum(fm, x, y, **kw)
        assert got.dtype == fm.dtype == torch.float64 and got.shape == (fm.numel,)
        torch.testing.assert_close(got, want, **TOL)


def test_buffers_live_on_the_model_device_not_the_default_device():
    # accumulators are created on fm.device: an ambient default device (here "meta") changes nothing
    model = tiny_mlp()
    x, y = data(5, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    layers = cv.kron_layers(model)
    bases = cv.kronecker_eigenbases(fm, layers, x)
    want = (cv.kronecker_factors(fm, layers, x), cv.ekfac_eigenvalues(fm, layers, x, bases), cv.per_sample_grads(fm, x, y))
    with torch.device("meta"):
        got = (cv.kronecker_factors(fm, layers, x), cv.ekfac_eigenvalues(fm, layers, x, bases), cv.per_sample_grads(fm, x, y))
    for layer in layers:
        for g, w in zip(got[0][layer.path] + (got[1][layer.path],), want[0][layer.path] + (want[1][layer.path],)):
            assert g.device.type == "cpu"
            torch.testing.assert_close(g, w, **TOL)
    assert got[2].device.type == "cpu"
    torch.testing.assert_close(got[2], want[2], **TOL)


def test_products_move_cpu_vectors_inputs_and_labels_to_the_model_device():
    # "meta" stands in for a GPU on the CPU-only test machines (shapes and dtypes, no data): a model there with
    # vectors, inputs and labels on the CPU (float32 vectors, too) must answer on the model's device in its dtype
    model = tiny_mlp().to("meta")
    x, y = data(5, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    V = torch.randn(2, fm.numel, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    got = {"ggn": cv.ggn_vector_product(fm, V, x), "hessian": cv.hessian_vector_product(fm, V, x, y),
           "grads": cv.per_sample_grads(fm, x, y), "margin grads": cv.per_sample_grads(fm, x, y, "margin")}
    for what, out in got.items():
        rows = len(V) if what in ("ggn", "hessian") else len(y)
        assert (out.device.type, out.shape, out.dtype) == ("meta", (rows, fm.numel), torch.float64), what


def test_products_do_not_depend_on_the_chunking():
    # batch/chunk sizes that don't divide N or P (and one example at a time) only split the same sums
    model = tiny_mlp()
    x, y = data(7, (1, 3, 4))
    fm = cv.FunctionalModel(model)
    V = torch.randn(3, fm.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G, H = cv.dense_ggn(fm, x, batch_size=7), cv.dense_hessian(fm, x, y, batch_size=7, chunk_size=fm.numel)
    for b in (1, 3, 4):
        torch.testing.assert_close(cv.dense_ggn(fm, x, batch_size=b), G, **TOL)
        torch.testing.assert_close(cv.dense_hessian(fm, x, y, batch_size=b, chunk_size=13), H, **TOL)
        torch.testing.assert_close(cv.ggn_vector_product(fm, V, x, batch_size=b), V @ G, **TOL)
        torch.testing.assert_close(cv.hessian_vector_product(fm, V, x, y, batch_size=b), V @ H, **TOL)
    torch.testing.assert_close(cv.dense_ggn(fm, x[:1]), explicit_ggn(model, x[:1]), **TOL)  # a single example
