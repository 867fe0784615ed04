"""Peer libraries as solvers (solvers/kronfluence.py, solvers/traker.py) and the machinery around them: a solver
whose optional package is missing is listed as unavailable with its install line; one without self-influence
gets an LDS row only. Where the packages are installed (`pip install -e '.[peers]'`) the adapters are checked
against our own solvers and against the definitions of their scores; elsewhere those tests skip, naming the
install line."""

import textwrap

import pytest
import torch

from benchmark import core
from benchmark.evaluate import SolverError, Task, campaign, fingerprint, records, registry
from benchmark.evaluate.engine import RunError
from benchmark.report import leaderboard
from benchmark.setup import deps, settings
from eval_helpers import synthetic_store, write_solver
from test_solvers import data, dense_reference, problem, rel_err

SETTING = "synthetic-mlp"
PEERS = ("kronfluence-identity", "kronfluence-diagonal", "kronfluence-kfac", "kronfluence-ekfac", "traker")

MISSING = textwrap.dedent('''
    from benchmark.evaluate import Solver


    class NeedsMissing(Solver):
        name = "toy-needs-missing"
        description = "a peer adapter whose package is not installed"
        requires = ("tdabench_no_such_package",)

        def ihvp(self, vectors):
            return vectors
''')


def installed(name):
    cls = registry.get(name)
    if cls.unavailable():
        pytest.skip(f"{name} {cls.unavailable()}")
    return cls


def test_a_solver_whose_package_is_missing_is_listed_with_its_install_line(tmp_path, monkeypatch, capsys):
    """Not an import error: the registry lists it, `tdabench solvers` says how to install it, the leaderboard row
    is n/a with that line, the campaign leaves it alone and a fit refuses clearly."""
    folder = tmp_path / "solvers"
    folder.mkdir()
    (folder / "needs_missing.py").write_text(MISSING)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    cls = registry.get("toy-needs-missing")
    assert not registry.broken()
    why = "needs tdabench_no_such_package: pip install tdabench_no_such_package"
    assert cls.unavailable() == why
    task, _, _ = problem()
    with pytest.raises(SolverError, match=f"'toy-needs-missing' {why}"):
        cls().fit(task)
    store, setting = synthetic_store(tmp_path), settings.get(SETTING)
    assert campaign.not_applicable(setting, cls) == why
    done, failures = campaign.update(store, [setting], [cls], log=lambda *a: None)
    assert [n for _, n, _ in done if n == cls.name] == [] and failures == {}
    df, _ = leaderboard.collect(store, [setting], [cls])
    assert df.set_index("solver").loc[cls.name, "status"] == f"n/a: {why}"
    with pytest.raises(RunError, match=why):
        records.run(store, setting, cls, tasks=["lds"], device="cpu", write=False, log=lambda *a: None)
    from benchmark import cli

    assert cli.main(["solvers"]) == 0
    assert f"UNAVAILABLE here: {why}" in capsys.readouterr().out


def test_the_peer_rows_name_the_peers_extra_when_absent(monkeypatch):
    """Whether or not the peer libraries are installed here: without them, each peer row is n/a with the extra."""
    real = deps.available
    monkeypatch.setattr(deps, "available", lambda m: False if m in ("kronfluence", "trak") else real(m))
    cnn = settings.get("mnist-cnn")
    for name in PEERS:
        cls = registry.get(name)
        module = "trak" if name == "traker" else "kronfluence"
        assert campaign.not_applicable(cnn, cls) == f"needs {module}: pip install 'tdabench[peers]'"
    assert campaign.not_applicable(cnn, registry.get("ekfac")) is None


def test_a_solver_without_self_influence_gets_an_lds_row_only(tmp_path, monkeypatch):
    """TRAK-like: no mislabel section is run or asked for, its probe fingerprints the scores only, and its row is
    'ok' with the mislabel artifact present."""
    folder = tmp_path / "solvers"
    path = write_solver(folder, "toy-exact")
    path.write_text(path.read_text() + textwrap.dedent('''

        class NoSelf(ToyExact):
            name = "toy-no-self"
            has_self_influence = False

            def self_scores(self, *args, **kwargs):
                raise RuntimeError("must not be called")
    '''))
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    cls = registry.get("toy-no-self")
    store, setting = synthetic_store(tmp_path), settings.get(SETTING)
    assert records.mislabel_available(store, setting)
    rec = records.run(store, setting, cls, device="cpu", log=lambda *a: None)
    assert "lds" in rec and "mislabel" not in rec and rec["lds"]["mean"] > 0.5
    probe = fingerprint.solver_probe(cls, cls.defaults)
    assert set(probe) == {"scores"}
    assert records.stale_reasons(rec, store, setting, cls) == {}
    with pytest.raises(RunError, match="no self-influence"):
        records.run(store, setting, cls, tasks=["mislabel"], device="cpu", write=False, log=lambda *a: None)
    df, _ = leaderboard.collect(store, [setting], [cls])
    assert df.set_index("solver").loc[cls.name, "status"] == "mislabel n/a: toy-no-self computes no self-influence"
    done, _ = campaign.update(store, [setting], [cls], log=lambda *a: None)
    assert [n for _, n, _ in done if n == cls.name] == []


# ---------------------------------------------------------------- Kronfluence, where installed

def test_kronfluence_identity_is_our_gradient_dot_product():
    """No curvature, so no sampling: Kronfluence's scores must equal ours to rounding — the sign (its measurement
    is −f), both measurements, the layer layout and the training-loss gradients all agree."""
    cls = installed("kronfluence-identity")
    for arch, measurement in (("cnn", "margin"), ("mlp", "loss")):
        task, x, y = problem(arch, n=24)
        task = Task(task.model, x, y, num_classes=4, measurement=measurement)
        qx, qy = data(5, tuple(x.shape[1:]), seed=7)
        peer, ours = cls().fit(task), registry.get("identity")().fit(task)
        torch.testing.assert_close(peer.scores(qx, qy, x, y), ours.scores(qx, qy, x, y), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(peer.self_scores(x, y), ours.self_scores(x, y), rtol=1e-6, atol=1e-8)
        assert peer.info()["library"] == "kronfluence" and peer.info()["library_version"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kronfluence_ekfac_agrees_with_ours(arch):
    """Both fit EK-FAC with labels sampled from the model, from different draws: scores agree up to that
    Monte-Carlo noise (Pearson ≥ 0.98 at λ = 0.1; measured 0.991 / 0.996). Our λ is Kronfluence's damping_factor:
    the two IHVPs differ by the curvature noise over λ, so their gap shrinks as λ grows (measured 0.20 / 0.10 at
    λ = 0.1, 0.008 / 0.014 at λ = 10), where a λ off by a factor (e.g. N = 48) would leave them far apart."""
    cls = installed("kronfluence-ekfac")
    task, x, y = problem(arch, n=48)
    qx, qy = data(5, tuple(x.shape[1:]), seed=7)
    peer, ours = cls(damping=0.1).fit(task), registry.get("ekfac")(damping=0.1).fit(task)
    a, b = peer.scores(qx, qy, x, y).double(), ours.scores(qx, qy, x, y).double()
    r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    assert r >= 0.98, r
    V = core.per_sample_grads(core.FunctionalModel(task.model), qx, qy, "margin")
    gaps = [rel_err(cls(damping=lam).fit(task).ihvp(V), registry.get("ekfac")(damping=lam).fit(task).ihvp(V))
            for lam in (0.1, 1.0, 10.0)]  # the factors are fitted once per task (cached)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.03, gaps
    # and there Kronfluence's EK-FAC is about as far from the exact damped inverse as ours
    ref = dense_reference(task, 10.0, V)
    e_peer = rel_err(cls(damping=10.0).fit(task).ihvp(V), ref)
    e_ours = rel_err(registry.get("ekfac")(damping=10.0).fit(task).ihvp(V), ref)
    assert e_peer < 1.5 * e_ours + 0.005, (e_peer, e_ours)


# ---------------------------------------------------------------- traker, where installed

def test_traker_scores_are_trak_on_our_scale():
    """τ = N · (1 − pᵢ) φ(q)ᵀ(ΦᵀΦ)⁻¹φ(zᵢ), φ = Rᵀ∇margin with traker's own Gaussian projection R (rebuilt here
    from its seed): the adapter's sign, scale (N and traker's kernel normalisation undone) and layout."""
    cls = installed("traker")
    from trak.projectors import BasicProjector, ProjectionType

    task, x, y = problem("cnn", n=200)
    k = 40
    s = cls(proj_dim=k).fit(task)
    qx, qy = data(5, tuple(x.shape[1:]), seed=7)
    got = s.scores(qx, qy, x, y).double()
    fm = core.FunctionalModel(task.model)
    R = BasicProjector(grad_dim=fm.numel, proj_dim=k, seed=task.seed, proj_type=ProjectionType.normal, device="cpu",
                       block_size=k).proj_matrix.double()
    phi, phi_q = core.per_sample_grads(fm, x, y, "margin") @ R, core.per_sample_grads(fm, qx, qy, "margin") @ R
    p = torch.softmax(task.model(x), -1).gather(1, y[:, None]).squeeze(1).detach()
    want = len(y) * (phi_q @ torch.linalg.solve(phi.T @ phi, phi.T)) * (1 - p)[None]
    assert rel_err(got, want) < 1e-4  # traker computes in float32
    assert rel_err(cls(proj_dim=k).fit(task).scores(qx, qy, x, y).double(), got) < 1e-6  # seeded
    with pytest.raises(SolverError, match="training set it was fitted on"):
        s.scores(qx, qy, x[:100], y[:100])
    with pytest.raises(SolverError, match="attributes the margin"):
        cls(proj_dim=k).fit(Task(task.model, x, y, num_classes=4, measurement="loss"))
    info = s.info()
    assert info["library"] == "traker" and info["library_version"] == "0.3.2"
