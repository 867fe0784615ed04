"""docs/writing-a-solver.md stays true: its worked example runs and is exact, passes every contract test a
registered solver gets, and its API reference is what the code says.

Regenerate the reference after changing the Solver API or benchmark.core:

    .venv/bin/python tests/test_solver_guide.py --update
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import test_solvers as contract
from benchmark import core
from benchmark import evaluate
from benchmark.evaluate import registry

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-solver.md"
BEGIN, END = "<!-- BEGIN GENERATED API -->", "<!-- END GENERATED API -->"
PRIVATE_HOOKS = ("_require_fit",)  # private, but every solver file calls it


# ---------------------------------------------------------------- the generated API reference

class _Text(str):
    """An annotation written as a string (``from __future__ import annotations``), shown without quotes."""

    def __repr__(self):
        return str(self)


def signature(obj) -> str:
    sig = inspect.signature(obj)

    def plain(annotation):
        return _Text(annotation.strip("'\"")) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=plain(sig.return_annotation)))


def value(v) -> str:
    """Constants as a reader would write them (classes and functions by name, no memory addresses)."""
    if isinstance(v, (type, types.FunctionType)):
        return v.__name__
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list)):
        inner = ", ".join(value(x) for x in v) + ("," if isinstance(v, tuple) and len(v) == 1 else "")
        return f"({inner})" if isinstance(v, tuple) else f"[{inner}]"
    return repr(v)


def solver_members() -> dict[str, object]:
    """The Solver API a solver file sees: its public methods (and _require_fit), in definition order."""
    return {name: m for name, m in vars(evaluate.Solver).items()
            if (not name.startswith("_") or name in PRIVATE_HOOKS)
            and (callable(m) or isinstance(m, (classmethod, staticmethod)))}


def api_reference() -> str:
    out = ["```python", "# benchmark.evaluate"]
    out += [f"class {cls.__name__}{signature(cls)}" for cls in (evaluate.Task, evaluate.Trajectory)]
    out += [f"DAMPING_GRID = {value(evaluate.DAMPING_GRID)}", f"COMMON_OPTIONS = {value(evaluate.COMMON_OPTIONS)}",
            "", "class Solver:"]
    out += [f"    {name}: {annotation} = {value(getattr(evaluate.Solver, name))}"
            for name, annotation in evaluate.Solver.__annotations__.items()]
    for name, member in solver_members().items():
        if isinstance(member, (classmethod, staticmethod)):
            out.append(f"    @{type(member).__name__}")
            member = member.__func__
        out.append(f"    def {name}{signature(member)}")
    groups: dict[str, list[str]] = {}
    for name, obj in sorted(vars(core).items()):
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if inspect.isclass(obj):
            try:
                line = f"class {name}{signature(obj)}"
            except ValueError:  # an exception class: its bases say what it is
                line = f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
            groups.setdefault(obj.__module__, []).append(line)
        elif inspect.isfunction(obj):
            groups.setdefault(obj.__module__, []).append(f"def {name}{signature(obj)}")
        else:
            groups.setdefault("benchmark.core (constants)", []).append(f"{name} = {value(obj)}")
    for module in sorted(groups, key=lambda m: (m.endswith("(constants)"), m)):
        out += ["", f"# {module}", *groups[module]]
    return "\n".join(out + ["```"])


def documented_reference(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def update() -> None:
    text = GUIDE.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    GUIDE.write_text(text[:start] + "\n" + api_reference() + "\n" + text[end:])


def test_the_api_reference_is_what_the_code_says():
    assert documented_reference(GUIDE.read_text()) == api_reference(), (
        "docs/writing-a-solver.md's API reference is out of date: run `.venv/bin/python tests/test_solver_guide.py "
        "--update`, and say in the page's prose what changed")


def test_the_prose_describes_every_hook_attribute_and_task_field():
    """The reference lists the API; the prose above it must say what each part is for."""
    text = GUIDE.read_text()
    prose = text[:text.index(BEGIN)]
    names = [*solver_members(), *evaluate.Solver.__annotations__, *evaluate.Task.__dataclass_fields__,
             *evaluate.COMMON_OPTIONS]
    missing = [n for n in names if f"`{n}" not in prose]
    assert not missing, f"docs/writing-a-solver.md does not describe {missing}"


# ---------------------------------------------------------------- the worked example

def example(path: str) -> str:
    """The code block of docs/writing-a-solver.md marked ``<!-- worked example: PATH -->``."""
    found = re.search(rf"<!-- worked example: {re.escape(path)} -->\n```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert found, f"docs/writing-a-solver.md has no worked example for {path}"
    return found.group(1)


@pytest.fixture
def diag(tmp_path, monkeypatch):
    """The guide's solver, registered from a temporary folder as an out-of-repository solver would be."""
    (tmp_path / "diag.py").write_text(example("solvers/diag.py"))
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(tmp_path))
    assert not [f for f in registry.broken() if Path(f).parent == tmp_path.resolve()], registry.broken()
    return registry.get("diag")


def test_the_worked_example_passes_its_own_test(diag):
    namespace = {}
    exec(compile(example("tests/test_diag.py"), "tests/test_diag.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_the_worked_example_is_the_damped_inverse_of_the_dense_ggn_diagonal(diag, arch):
    """ihvp = (diag(G) + λI)⁻¹v to rounding, G from core.dense_ggn (an independent construction: Jacobians and
    the logit Hessian's factor, not per-class gradients); with last_blocks=1, the diagonal of G's head block."""
    task, x, _ = contract.problem(arch)
    G = core.dense_ggn(core.FunctionalModel(task.model, torch.float64), x)
    v = torch.randn(4, len(G), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for damping in (1e-3, 0.1):
        torch.testing.assert_close(diag(damping=damping).fit(task).ihvp(v), v / (G.diagonal() + damping),
                                   rtol=1e-10, atol=0)
    head = diag(damping=0.1, last_blocks=1).fit(task)
    P = head.functional().numel  # the head is the last Linear: the last P coordinates
    torch.testing.assert_close(head.ihvp(v[:, -P:]), v[:, -P:] / (G.diagonal()[-P:] + 0.1), rtol=1e-10, atol=0)
    with pytest.raises(core.SolverError, match="use damping > 0"):
        # a zero input leaves the first layer's weights without curvature: at λ = 0 the inverse does not exist
        diag(damping=0.0).fit(evaluate.Task(task.model, torch.zeros(1, *x.shape[1:], dtype=x.dtype), task.train_y[:1], 4))


def contract_tests() -> list:
    """The tests of tests/test_solvers.py parametrised over every registered solver by name alone."""
    found = []
    for name, f in vars(contract).items():
        marks = [m for m in getattr(f, "pytestmark", []) if m.name == "parametrize"]
        if name.startswith("test_") and marks and list(inspect.signature(f).parameters) == ["name"] \
                and marks[0].args[0] == "name" and marks[0].args[1] in (contract.SOLVERS, contract.IHVP_SOLVERS):
            found.append(f)
    return found


def test_the_worked_example_passes_every_contract_test(diag):
    tests = contract_tests()
    assert {"test_solver_files_import_only_core_and_evaluate", "test_ihvp_approximates_the_damped_inverse",
            "test_last_blocks_is_the_solver_on_the_model_with_the_other_parameters_constant",
            "test_scores_follow_the_definition_and_chunking_changes_nothing"} <= {t.__name__ for t in tests}
    for test in tests:
        test("diag")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {sys.argv[0]} --update   (rewrites the API reference in {GUIDE})")
    update()
    print(f"updated the API reference in {GUIDE}")
