"""The installable package: what a wheel carries, and that it works outside any clone (issue: "pip install gives a
working package"). The wheel test builds the project's wheel and installs it, without its dependencies, into a
fresh virtual environment that borrows this environment's packages (torch & co.), then runs it from a folder that
is not a clone."""

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from benchmark.setup import plugins
from benchmark.setup.store import REPO_ROOT


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_package_list_names_every_subpackage_and_the_plugin_folders():
    tool = _pyproject()["tool"]["setuptools"]
    on_disk = {"benchmark"} | {f"benchmark.{p.name}" for p in (REPO_ROOT / "benchmark").iterdir()
                               if (p / "__init__.py").is_file()}
    listed = set(tool["packages"])
    assert on_disk <= listed, f"pyproject.toml's packages miss {sorted(on_disk - listed)}"
    assert "tdabench" in listed
    # The plugin folders travel inside the package, under names that shadow nothing (never a top-level `datasets`).
    assert tool["package-dir"] == {f"benchmark._builtin.{kind}": kind for kind in plugins.KINDS}
    assert not any(name.split(".")[0] in plugins.KINDS for name in listed)


def test_an_empty_registry_is_an_error_saying_where_it_looked(tmp_path, monkeypatch, capsys):
    from benchmark.cli import main
    from benchmark.evaluate import registry

    empty = tmp_path / "solvers"
    empty.mkdir()
    monkeypatch.setattr(plugins, "builtin_dir", lambda kind: empty)
    monkeypatch.delenv("TDABENCH_SOLVERS_PATH", raising=False)
    with pytest.raises(plugins.EmptyRegistry, match="no solvers found"):
        registry.available()
    assert main(["solvers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(empty) in err and "no *.py files" in err


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """A fresh virtual environment holding only the built wheel (its dependencies come from this environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "dist"), str(REPO_ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("tdabench-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # Borrow torch, numpy, ...: a path line, not this environment's .pth files (so no editable clone leaks in).
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    names = zipfile.ZipFile(wheel).namelist()
    cli = venv / "bin" / "tdabench"
    cli.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom benchmark.cli import main\nsys.exit(main())\n")
    cli.chmod(0o755)
    return venv, names


def _run(venv, *args, cwd, **env):
    return subprocess.run([str(venv / "bin" / "tdabench"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("TDABENCH_")}, **env})


@pytest.mark.slow
def test_the_wheel_carries_the_settings_and_solvers(installed_wheel):
    _, names = installed_wheel
    solvers = {Path(n).stem for n in names if n.startswith("benchmark/_builtin/solvers/")}
    datasets = {Path(n).stem for n in names if n.startswith("benchmark/_builtin/datasets/")}
    assert solvers == {p.stem for p in (REPO_ROOT / "solvers").glob("*.py")}
    assert datasets == {p.stem for p in (REPO_ROOT / "datasets").glob("*.py")}
    assert "tdabench/__init__.py" in names
    assert not any(n.startswith(("datasets/", "solvers/", "results/", "tests/")) for n in names)


@pytest.mark.slow
def test_the_installed_package_works_from_any_folder(installed_wheel, tmp_path):
    venv, _ = installed_wheel
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    out = _run(venv, "settings", cwd=elsewhere, XDG_CACHE_HOME=str(cache))
    assert out.returncode == 0, out.stderr
    assert "mnist-lr" in out.stdout and "mnist-cnn" in out.stdout
    out = _run(venv, "solvers", cwd=elsewhere, XDG_CACHE_HOME=str(cache))
    assert out.returncode == 0, out.stderr
    assert "ekfac" in out.stdout and "BROKEN" not in out.stdout
    # The package's own modules, not a clone's: the plugins come from inside the installed package.
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import tdabench, benchmark; from benchmark.setup import plugins, store; "
                            "print(benchmark.__file__); print(plugins.builtin_dir('solvers')); "
                            "print(store.default_root()); print(len(tdabench.solvers()))"],
                           cwd=elsewhere, capture_output=True, text=True,
                           env={**os.environ, "XDG_CACHE_HOME": str(cache), "TDABENCH_RESULTS": ""})
    assert probe.returncode == 0, probe.stderr
    package, builtin, root, count = probe.stdout.split("\n")[:4]
    assert Path(package).is_relative_to(venv) and Path(builtin).is_relative_to(venv)
    assert Path(root) == cache / "tdabench" / "results"
    from benchmark.evaluate import registry

    assert int(count) == len(registry.available())  # every solver the clone registers
    # Reading results that are not there yet: one line saying how to fetch them.
    out = _run(venv, "table1", "mnist-lr", cwd=elsewhere, XDG_CACHE_HOME=str(cache))
    assert out.returncode == 2 and "tdabench fetch" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.slow
def test_the_wheel_fetches_a_bundle_and_runs_the_readme_example_outside_a_clone(installed_wheel, tmp_path):
    """The issue's whole path: a wheel outside any clone fetches the mnist-lr bundle from a local file into its
    results root and runs README's API example, printing the committed EK-FAC LDS."""
    from eval_helpers import require_real_data

    from benchmark.cli import main
    from benchmark.evaluate import records
    from benchmark.setup import settings
    from benchmark.setup.store import ResultsStore

    require_real_data(settings.get("mnist-lr"))
    venv, _ = installed_wheel
    assert main(["export", "mnist-lr", "--out", str(tmp_path / "dist"), "--quiet"]) == 0
    bundle = next((tmp_path / "dist").glob("tdabench-mnist-lr-*.tar.gz"))
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "cache-results"
    elsewhere.mkdir()
    out = _run(venv, "fetch", "mnist-lr", "--from", str(bundle), cwd=elsewhere, TDABENCH_RESULTS=str(root))
    assert out.returncode == 0, out.stderr
    example = subprocess.run([str(venv / "bin" / "python"), str(REPO_ROOT / "examples" / "api_example.py")],
                             cwd=elsewhere, capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("TDABENCH_")},
                                  "TDABENCH_RESULTS": str(root), "TDABENCH_OFFLINE": "1"})
    assert example.returncode == 0, example.stderr[-2000:]
    committed = records.read_record(ResultsStore.default(), "mnist-lr", "ekfac")["lds"]
    first = example.stdout.splitlines()[0]
    assert f"LDS {committed['mean']:.4f} ± {committed['se']:.4f}" in first
    assert "identical on all" in example.stdout.splitlines()[1]
