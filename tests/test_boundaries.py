"""Every hook a solver file overrides is checked where it returns: a block of the wrong shape is a one-line error
naming the solver, its file and the hook, never a number (a query column of uninitialised memory, a training
example silently left out of the subset sums) or a raw torch traceback; and no record is written."""

import textwrap

import pytest
import torch
from eval_helpers import synthetic_store

from benchmark import cli
from benchmark.evaluate import Task, records, registry
from benchmark.evaluate.solver import SolverContractError, SolverError
from benchmark.setup import settings

SETTING = "synthetic-mlp"

# A scaled identity inverse: correct in everything but the one hook each test breaks.
PLUGIN = textwrap.dedent('''
    from benchmark.evaluate import Solver


    class Broken(Solver):
        name = "{name}"
        parameters = {{"damping": [1e-2, 1.0]}}
        defaults = {{"damping": 1.0}}

        def fit(self, task):
            return super().fit(task)

        def ihvp(self, vectors):
            return (vectors / (1.0 + self.params["damping"])){ihvp_slice}
    {extra}''')

BREAKS = {
    "drop-query": ("query_features", "", '''
        def query_features(self, query_x, query_y, offset=0):
            return super().query_features(query_x, query_y, offset)[:-1]
    '''),
    "narrow-ihvp": ("ihvp", "[:, :-1]", ""),
    "short-self": ("self_scores", "", '''
        def self_scores(self, train_x, train_y, *, train_chunk=None):
            return super().self_scores(train_x, train_y, train_chunk=train_chunk)[:-1]
    '''),
    "drop-train": ("train_features", "", '''
        def train_features(self, train_x, train_y, offset=0):
            return super().train_features(train_x, train_y, offset)[:-1]
    '''),
}


def _plugin(folder, name):
    hook, ihvp_slice, extra = BREAKS[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}.py"
    path.write_text(PLUGIN.format(name=name, ihvp_slice=ihvp_slice, extra=textwrap.indent(textwrap.dedent(extra),
                                                                                             "    ")))
    return hook, path


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_hook_of_the_wrong_shape_is_one_line_naming_solver_and_hook_and_writes_no_record(name, tmp_path,
                                                                                          monkeypatch, capsys):
    hook, path = _plugin(tmp_path / "solvers", name)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(path.parent))
    store = synthetic_store(tmp_path)
    task = "mislabel" if hook == "self_scores" else "lds"
    code = cli.main(["--results", str(store.root), "run", "--setting", SETTING, "--solver", name, "--task", task,
                     "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars write to stderr before it
    assert code == 2
    assert err.startswith("tdabench: error: ") and f"solver {name!r} ({path})" in err and f"{hook}()" in err
    assert "every configuration" not in err  # a bug in the file stops the grid search; it is no failing damping
    assert not records.run_path(store, SETTING, name).exists()


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_the_check_holds_for_every_caller_not_only_the_engine(name, tmp_path, monkeypatch):
    """Studies call ihvp, scores and self_scores directly: the check sits on the hook itself."""
    _, path = _plugin(tmp_path / "solvers", name)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(path.parent))
    data = settings.get(SETTING).data()
    x, y = data.train_x[:10], data.train_y[:10]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), data.num_classes))
    s = registry.get(name)().fit(Task(model, x, y, data.num_classes))
    with pytest.raises(SolverContractError, match=f"solver {name!r}"):
        if name == "narrow-ihvp":
            s.ihvp(torch.ones(3, sum(p.numel() for p in model.parameters())))
        elif name == "short-self":
            s.self_scores(x, y)
        else:
            s.scores(x[:4], y[:4], x, y)


def test_a_correct_override_returns_its_own_result_and_nan_self_influence_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "solvers"
    folder.mkdir()
    (folder / "nanself.py").write_text(textwrap.dedent('''
        import torch
        from benchmark.evaluate import Solver


        class NanSelf(Solver):
            name = "nan-self"

            def fit(self, task):
                return super().fit(task)

            def ihvp(self, vectors):
                return vectors.clone()

            def self_scores(self, train_x, train_y, *, train_chunk=None):
                out = super().self_scores(train_x, train_y, train_chunk=train_chunk)
                out[3] = float("nan")
                return out
    '''))
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    data = settings.get(SETTING).data()
    x, y = data.train_x[:10], data.train_y[:10]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), data.num_classes))
    s = registry.get("nan-self")().fit(Task(model, x, y, data.num_classes))
    v = torch.randn(2, sum(p.numel() for p in model.parameters()))
    assert torch.equal(s.ihvp(v), v)  # the check passes a correct result through untouched
    with pytest.raises(SolverError, match=r"non-finite self-influence score \(nan-self\) for example 3"):
        s.self_scores(x, y)
