"""The Makefile's bootstrap: the virtual environment is reinstalled when pyproject.toml's content changes, never
because a checkout touched the file."""

import hashlib
import shutil
import subprocess

import pytest

from benchmark.setup.plugins import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (apt-get install make)")


def _dry_run(venv, *extra):
    return subprocess.run(["make", "-n", *extra, "venv", f"VENV={venv}"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_venv_is_reinstalled_on_content_changes_only(tmp_path):
    digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    assert "pip install" in _dry_run(venv)  # nothing installed yet
    (venv / f".installed-{digest}").touch()
    assert "pip install" not in _dry_run(venv)
    # pyproject.toml newer than the stamp (a fresh checkout, a `touch`): same content, nothing to reinstall
    assert "pip install" not in _dry_run(venv, "-W", "pyproject.toml")
    (venv / f".installed-{digest}").rename(venv / ".installed-000000000000")  # installed from another content
    assert "pip install" in _dry_run(venv)


def test_make_help_lists_every_target():
    """`make help` is generated from the Makefile's target comments: every phony target is listed with its text."""
    text = (REPO_ROOT / "Makefile").read_text()
    phony = {t for line in text.splitlines() if line.startswith(".PHONY:") for t in line.split(":", 1)[1].split()}
    out = subprocess.run(["make", "-s", "help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    listed = {}
    for line in out.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0] == "make":
            listed[words[1]] = words[2]
    assert phony, "no .PHONY targets found"
    assert sorted(phony - set(listed)) == []
    assert all(len(help_text) > 10 for help_text in listed.values())
