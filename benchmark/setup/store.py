"""Floor 2: where results live. One :class:`ResultsStore` knows every folder of the results tree.

The default root is the repository's ``results/`` (the committed artifacts and records); ``$TDABENCH_RESULTS``
or the command line's ``--results`` points it elsewhere, so solvers developed outside the repository and
tests never write into it. Everything below the command line receives a store, never a loose path.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "TDABENCH_RESULTS"
# A clone holds the project's files beside the package; an installed wheel holds only the package (and its
# site-packages folder has a Hugging Face ``datasets/`` beside it, so the plugin folders alone prove nothing).
IN_CLONE = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "solvers").is_dir()


def default_root() -> Path:
    """$TDABENCH_RESULTS, else a clone's ``results/``, else (an installed package) a user cache folder that
    ``tdabench fetch`` fills with a setting's precomputed results."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser()
    if IN_CLONE:
        return REPO_ROOT / "results"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tdabench" / "results"


class StoreError(RuntimeError):
    """The results folder cannot be written (permissions, a full disk, a file where a folder should be)."""


def describe_os_error(exc: OSError, path: Path | str | None = None) -> str:
    """One line that says what went wrong with a file and what to do about it."""
    where = path or exc.filename or "the results folder"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device holding {where}; free some space and run the command again (it resumes)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {where} ({exc.strerror}); make it writable, or write results elsewhere with "
                f"--results DIR or ${RESULTS_ENV}")
    return (f"cannot write {where}: {exc.strerror or exc}; fix the path, or write results elsewhere with --results DIR "
            f"or ${RESULTS_ENV}")


@dataclass(frozen=True)
class ResultsStore:
    root: Path

    @classmethod
    def default(cls) -> "ResultsStore":
        return cls(default_root())

    # -- the folders ---------------------------------------------------------------------------
    @property
    def gt(self) -> Path:
        """Ground-truth artifacts the benchmark reports on."""
        return self.root / "gt"

    @property
    def gt_studies(self) -> Path:
        """Ground truths built to study a protocol factor; never the benchmark's ground truth."""
        return self.root / "gt-studies"

    @property
    def mislabel(self) -> Path:
        return self.root / "mislabel"

    @property
    def models(self) -> Path:
        """The explained-model zoo."""
        return self.root / "models"

    @property
    def counterfactual(self) -> Path:
        """Remove-top-k: models retrained without each solver's most influential points, and the study's tables."""
        return self.root / "counterfactual"

    @property
    def unlearning(self) -> Path:
        """Newton unlearning and label repair: models retrained without (or with repaired) points, and the tables."""
        return self.root / "unlearning"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def gap(self) -> Path:
        return self.root / "gap"

    @property
    def qualitative(self) -> Path:
        """The training images each solver blames per query, and the top self-influence images."""
        return self.root / "qualitative"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def perf(self) -> Path:
        return self.root / "perf"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def baselines(self) -> Path:
        """The CI regression check's recorded attribution quality."""
        return self.root / "baselines.json"

    @property
    def index(self) -> Path:
        """The pinned root hash of every committed artifact."""
        return self.root / "index.json"

    def is_default(self) -> bool:
        """Whether this is the root a command reaches without --results (a clone's ``results/``, or an installed
        package's cache folder)."""
        return self.root.resolve() == default_root().resolve()

    def command_words(self) -> list[str]:
        """What a printed ``tdabench`` command needs to reach this store: nothing for the repository's results/, else
        ``--results ROOT`` (a resume hint must find the same folder, whatever the shell it is pasted into)."""
        return [] if self.is_default() else ["--results", str(self.root.resolve())]

    def check_exists(self, origin: str) -> None:
        """For commands that read results: a root that does not exist is a mistyped path (``origin`` says where it
        was set), never an empty benchmark that prints "no committed record"."""
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            fix = ("unset both to read the repository's results/" if IN_CLONE else
                   f"fill {default_root()} with a setting's precomputed results: `tdabench fetch SETTING --from "
                   f"BUNDLE`")
            raise StoreError(f"results folder {self.root} (from {origin}) {what}; point --results DIR or "
                             f"${RESULTS_ENV} at an existing results folder, or {fix}")

    def relative(self, path: Path | str) -> str:
        """``path`` as it is recorded in records: relative to the store's root (``gt/mnist-cnn/v1``)."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def check_writable(self, *folders: Path) -> None:
        """Fail before any work starts when an output folder cannot be written (not after hours of it)."""
        for folder in folders or (self.root,):
            folder = Path(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
                try:
                    os.write(fd, b"x" * 4096)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(probe)
            except OSError as exc:
                raise StoreError(describe_os_error(exc, folder)) from None
