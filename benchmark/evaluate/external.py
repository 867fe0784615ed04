"""Floor 4: the benchmark from your own code — a setting's verified ground truth, the model its leaderboard explains
and that model's data as objects (:class:`Bench`, ``tdabench.load``), and score matrices computed anywhere, scored
by the same metrics as every leaderboard row.

- :meth:`Bench.evaluate` takes scores of the *reported* queries only and :meth:`Bench.evaluate_validation` those of
  the validation queries (for tuning); each checks the matrix by its shape, and the result says which it is.
- :meth:`Bench.evaluate_mislabel`: self-influence of the corrupted-label model's training points -> recall, AUC.
- :meth:`Bench.compare`: a result against a leaderboard row, paired query by query where the two are paired.
- :meth:`Bench.run`: a Solver subclass defined anywhere (a notebook's ``__main__`` too) through the engine; it runs
  in this process, so nothing has to pickle it.
- :func:`load_scores`, :func:`write_record`: a score file from another program and its run record, marked
  "external scores" (``tdabench evaluate SETTING --scores FILE --name NAME``).

A score matrix is (Q, N): row q is the query ``queries.reported.indices[q]`` (a test-set index, the ground truth's
``queries.npy`` in order), column i the setting's training point i; τ(q, i) > 0 where up-weighting training point i
raises the query's measurement (docs/protocol.md, Conventions).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.stats import noise_ceiling
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import mislabel as mislabel_mod
from ..groundtruth import zoo as zoo_mod
from ..groundtruth.artifact import GroundTruth
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError, code_version, environment, sha256_file, write_json
from ..setup.store import ResultsStore
from . import engine, metrics, records, registry
from .cost import Cost
from .engine import BASELINES, LOSS, Baseline, RunError
from .solver import Solver, SolverError, Task

EXTERNAL = "external scores"
REPORTED, VALIDATION = "reported", "validation"
FORMATS = {".npy": "npy", ".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}
WRITERS = {"npy": "numpy.save", "pt": "torch.save", "safetensors": "safetensors.torch.save_file"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class ScoresError(ValueError):
    """A score matrix (or file) the benchmark cannot score: wrong shape or order, not finite, not a score matrix."""


# ---------------------------------------------------------------- what a user gets

@dataclass(frozen=True, eq=False)
class Examples:
    """Inputs ``x`` (n, *input shape), float, and labels ``y`` (n,), int64, on the CPU."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Queries(Examples):
    """One query split: ``indices`` are test-set indices, in the row order a score matrix of this split has."""

    split: str = REPORTED
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __repr__(self) -> str:
        return f"Queries({self.split}: {len(self)} test points)"


@dataclass(frozen=True, eq=False)
class QuerySplits:
    """The validation queries (choose hyper-parameters on these) and the reported ones (evaluate on these once)."""

    validation: Queries
    reported: Queries


@dataclass(frozen=True, eq=False)
class LDSResult:
    """An LDS evaluation. ``split`` is "reported" (a number to report, comparable with the leaderboard) or
    "validation" (for tuning only); ``section`` is the ``lds`` section a run record holds."""

    setting: str
    split: str
    section: dict
    name: str | None = None

    mean = property(lambda self: self.section["mean"])
    se = property(lambda self: self.section["se"])
    ceiling = property(lambda self: self.section.get("ceiling"))
    of_ceiling = property(lambda self: self.section.get("of_ceiling"))
    queries = property(lambda self: self.section["queries"])

    @property
    def ci(self) -> tuple[float, float]:
        """The bootstrap 95% interval of the mean over queries."""
        return self.section["ci_low"], self.section["ci_high"]

    @property
    def per_query(self) -> np.ndarray:
        """(Q,) LDS per query in the split's order (NaN where undefined), rounded to 6 decimals as records keep them."""
        return np.array([np.nan if v is None else v for v in self.section["per_query"]], dtype=np.float64)

    def __str__(self) -> str:
        what = (f"{self.queries} reported queries" if self.split == REPORTED else
                f"{self.queries} VALIDATION queries (for tuning; report bench.evaluate on the reported ones)")
        head = f"{self.setting}{' / ' + self.name if self.name else ''}, {what}: "
        if self.mean is None or not math.isfinite(self.mean):
            return head + f"LDS undefined ({self.section.get('undefined', 'no query has a defined correlation')})"
        text = f"LDS {self.mean:.4f} ± {self.se:.4f} (95% CI {self.ci[0]:.4f} to {self.ci[1]:.4f})"
        if self.ceiling:
            text += f"; noise ceiling {self.ceiling:.3f}, {self.of_ceiling:.2f} of it"
        text += f"; explaining {records.explained_label(self.section)}; per-query values: .per_query"
        undefined = self.section.get("n_undefined") or 0
        return head + text + (f" ({undefined} undefined)" if undefined else "")


@dataclass(frozen=True, eq=False)
class MislabelResult:
    """Mislabel detection from self-influence scores; ``section`` is the ``mislabel`` section a run record holds,
    ``baselines`` the random and training-loss orders on the same corrupted model."""

    setting: str
    section: dict
    baselines: dict = field(default_factory=dict)

    auc = property(lambda self: self.section["auc"])
    auc_se = property(lambda self: self.section["auc_se"])

    @property
    def recall(self) -> dict[float, float]:
        """{fraction inspected: share of the flipped points found}, at 10..50%."""
        return {f: self.section[f"recall_{round(100 * f)}"] for f in metrics.FRACTIONS}

    def __str__(self) -> str:
        s = self.section

        def line(sec):
            return (" / ".join(f"{sec[f'recall_{round(100 * f)}']:.3f}" for f in metrics.FRACTIONS)
                    + f", AUC {sec['auc']:.3f}")
        text = (f"{self.setting}, mislabel detection ({s['n_flipped']} of {s['n']} training labels flipped, the "
                f"corrupted-label model): recall@10/20/30/40/50% {line(s)} ± {s['auc_se']:.3f}")
        return text + "".join(f"; {name}: {line(sec)}" for name, sec in self.baselines.items())


@dataclass(frozen=True, eq=False)
class Comparison:
    """A result against a leaderboard row: paired per-query difference (``difference`` ± ``se``, ``wins``: share of
    queries where the result is higher) where the two score the same queries against the same target explaining
    models of the same artifact, else ``unpaired_reasons``; ``stale``: why the row is no longer current ([] = it is)."""

    setting: str
    row: str
    result: LDSResult
    row_lds: dict
    unpaired_reasons: list
    stale: list
    paired: dict | None = None

    difference = property(lambda self: None if self.paired is None else self.paired["difference"])
    se = property(lambda self: None if self.paired is None else self.paired["se"])

    def __str__(self) -> str:
        mine, row = self.result, self.row_lds
        text = (f"{self.setting}: {mine.name or 'this result'} {mine.mean:.4f} ± {mine.se:.4f} vs row {self.row} "
                f"{row['mean']:.4f} ± {row['se']:.4f}")
        if self.paired is not None:
            p = self.paired
            text += (f": identical on all {p['n']} paired queries" if p["max_abs"] == 0 else
                     f": paired difference {p['difference']:+.4f} ± {p['se']:.4f} over {p['n']} queries (higher on "
                     f"{p['wins']:.0%} of them, max |difference| {p['max_abs']:.2g})")
        else:
            text += f": NOT PAIRED ({'; '.join(self.unpaired_reasons)})"
        if self.stale:
            text += f"; the row is STALE: {'; '.join(self.stale)}"
        return text


@dataclass(frozen=True, eq=False)
class RunResult:
    """A solver evaluated through the engine (:meth:`Bench.run`): its run ``record`` (sealed; written at ``path``
    when asked)."""

    setting: str
    record: dict
    path: Path | None = None

    @property
    def lds(self) -> LDSResult | None:
        sec = self.record.get("lds")
        return None if sec is None else LDSResult(self.setting, REPORTED, sec, self.record["solver"])

    @property
    def mislabel(self) -> MislabelResult | None:
        sec = self.record.get("mislabel")
        return None if sec is None else MislabelResult(self.setting, sec)

    def __str__(self) -> str:
        lines = [str(part) for part in (self.lds, self.mislabel) if part is not None]
        if self.lds is not None:
            lines[0] += f"; params {self.lds.section.get('params')} ({self.lds.section['selection']['method']})"
        return "\n".join(lines + [f"wrote {self.path}" if self.path else
                                  "(not written: bench.run(..., write=True) writes its run record)"])


# ---------------------------------------------------------------- the corrupted-label model

class MislabelBench:
    """The leaderboard's corrupted-label model and its training set (the setting's training points, 10% of their
    labels flipped, in the same order). Which points were flipped is what a method must find: it is not handed out."""

    def __init__(self, bench: "Bench", art: mislabel_mod.MislabelArtifact):
        self._bench, self._artifact = bench, art
        self.model = art.model(0)
        self.train = Examples(bench.train.x, art.labels)
        self.n_flipped = int(len(art.flipped))
        self._task = None
        self._baselines = None

    def task(self) -> Task:
        """The solver Task of the corrupted-label model (one per bench, so refits share their curvature)."""
        if self._task is None:  # measurement "loss", as the engine fits it for self-influence
            self._task = Task(self.model.to(self._bench.device).eval(), self.train.x, self.train.y,
                              self._bench.num_classes, "loss", self._bench.device)
        return self._task

    def self_scores(self, cls: type[Solver], params: dict | None = None) -> np.ndarray:
        """(N,) self-influence of ``cls`` with ``params`` on the corrupted-label model, fitted as the engine fits it."""
        engine.check_applicable(cls, self.model, params)
        task = self.task()
        fitted = engine.fit(cls, {**cls.defaults, **(params or {})}, [self.model], task.train_x, task.train_y,
                            task.num_classes, "loss", task.device, Cost(task.device), "fit", task.cache)
        return fitted[0].self_scores(task.train_x, task.train_y).detach().cpu().numpy()

    def baselines(self) -> dict:
        """The random order's expected numbers and the training-loss order on this model (computed once)."""
        if self._baselines is None:
            art = self._artifact
            self._baselines = {"random order": metrics.random_baseline(len(art.labels), len(art.flipped)),
                               "training-loss order": engine.evaluate_mislabel(art, LOSS, device=self._bench.device)}
        return self._baselines

    def __repr__(self) -> str:
        return (f"MislabelBench({self._bench.setting.name}: {len(self.train)} training points, {self.n_flipped} "
                f"labels flipped; {self._bench.store.relative(self._artifact.root)})")


# ---------------------------------------------------------------- the bench

class Bench:
    """A setting's verified ground truth, the model its leaderboard explains, and the data, ready for your code.

    ``model`` is the leaderboard's explained model (zoo model 0 where the setting has a zoo: seeded apart from every
    ground-truth model; else the ground truth's full-data model 0), ``train`` its training set, ``queries`` the
    validation and reported query splits. ``resolve`` turns a row's solver name into its class, so that a compared
    row can be checked for staleness (the front door passes the registry's)."""

    def __init__(self, store: ResultsStore, setting: settings_mod.Setting, gt: GroundTruth,
                 explained: engine.Explained, *, resolve=None, device=None):
        from ..setup.training import default_device

        self.store, self.setting, self.ground_truth, self.explained = store, setting, gt, explained
        self.device = torch.device(device or default_device())
        self.measurement = setting.measurement
        self._resolve = resolve
        data = setting.data()
        self.num_classes = data.num_classes
        self.train = Examples(data.train_x, data.train_y)
        q, v = gt.queries, gt.validation_queries
        self.queries = QuerySplits(
            validation=Queries(data.test_x[torch.from_numpy(v)], data.test_y[torch.from_numpy(v)], VALIDATION, v),
            reported=Queries(data.test_x[torch.from_numpy(q)], data.test_y[torch.from_numpy(q)], REPORTED, q))
        self.replicas = gt.complete_replicas()
        if not self.replicas:
            raise ArtifactError(f"{gt.root}: no seed replica is complete yet; finish it with "
                                f"`tdabench gt {setting.name}`")
        self._task = None
        self._mislabel = None

    @classmethod
    def load(cls, store: ResultsStore, setting: settings_mod.Setting, *, resolve=None, device=None) -> "Bench":
        """The ground truth the leaderboard uses now (verified: every file, its pinned root hash, the manifest against
        its files) and the model its rows explain."""
        root = gt_artifact.current(store, setting)
        if root is None:
            raise ArtifactError(f"no ground truth for {setting.name!r} under {store.gt / setting.name}; build it with "
                                f"`tdabench gt {setting.name}` or fetch it with `tdabench fetch {setting.name}`")
        gt = GroundTruth.open(root, setting, allow_incomplete=True, store=store)
        # New rows explain the zoo where the setting has one (the uncoupled protocol), as campaign.default_explain.
        source = "zoo" if zoo_mod.exists(store, setting) else "ground truth"
        return cls(store, setting, gt, records.explained_models(store, gt, source, 1), resolve=resolve, device=device)

    @property
    def model(self) -> torch.nn.Module:
        return self.explained.models[0]

    def __repr__(self) -> str:
        man, explained = self.ground_truth.manifest, records.explained_label({"explained": self.explained.reference})
        state = "complete" if man.get("complete") else f"INCOMPLETE: replicas {self.replicas}"
        return (f"Bench({self.setting.name}: ground truth {man['version']} ({state}, verified, root hash "
                f"{self.ground_truth.root_hash()[:12]}), explaining {explained}; "
                f"{len(self.train):,} training points, {len(self.queries.validation):,} validation and "
                f"{len(self.queries.reported):,} reported queries; measurement {self.measurement})")

    # -- fitting solvers to the bench's model ---------------------------------------------------
    def task(self, model: torch.nn.Module | None = None, train: Examples | None = None) -> Task:
        """A solver Task for ``model`` (default: the explained model, with its training trajectory where it comes from
        the zoo) on ``train`` (default: its training set). The default one is made once, so refits share curvature."""
        if (model is None or model is self.model) and (train is None or train is self.train):
            if self._task is None:
                trajectory = None if self.explained.trajectories is None else self.explained.trajectories[0]
                self._task = Task(self.model.to(self.device).eval(), self.train.x, self.train.y, self.num_classes,
                                  self.measurement, self.device, trajectory=trajectory)
            return self._task
        train = self.train if train is None else train
        return Task(model.to(self.device).eval(), train.x, train.y, self.num_classes, self.measurement, self.device)

    def solver_scores(self, cls: type[Solver], queries: Queries, params: dict | None = None) -> np.ndarray:
        """(Q, N) float32 scores of ``cls`` with ``params`` on ``queries`` of the explained model, fitted as the
        engine fits it (same task, seed and trajectory)."""
        if not isinstance(queries, Queries):
            raise TypeError("solver_scores takes a query split: bench.queries.validation or bench.queries.reported")
        engine.check_applicable(cls, self.model, params)
        task = self.task()
        fitted = engine.fit(cls, {**cls.defaults, **(params or {})}, [self.model], task.train_x, task.train_y,
                            self.num_classes, self.measurement, self.device, Cost(self.device), "fit", task.cache,
                            self.explained.trajectories)
        return fitted[0].scores(queries.x.to(self.device), queries.y.to(self.device), task.train_x,
                                task.train_y).detach().cpu().numpy()

    # -- evaluating scores ----------------------------------------------------------------------
    def evaluate(self, scores) -> LDSResult:
        """LDS of (Q, N) scores of the REPORTED queries: the number to report, paired with the leaderboard's rows."""
        return self._evaluate(scores, REPORTED)

    def evaluate_validation(self, scores) -> LDSResult:
        """LDS of (V, N) scores of the VALIDATION queries: for choosing hyper-parameters, never for reporting."""
        return self._evaluate(scores, VALIDATION)

    def expected_shape(self, split: str) -> tuple[int, int]:
        return len(getattr(self.queries, split)), len(self.train)

    def _evaluate(self, scores, split: str) -> LDSResult:
        arr = check_scores(scores, self, split)
        gt, q = self.ground_truth, len(self.queries.reported)
        cols = slice(0, q) if split == REPORTED else slice(q, None)
        target = gt.target(self.measurement, "queries" if split == REPORTED else "validation", self.replicas)
        ceiling = noise_ceiling(gt.outputs[self.measurement][self.replicas][:, :, cols])
        summary = metrics.lds_summary(metrics.lds_per_query(arr, gt.masks, target), ceiling.get("lds_ceiling"))
        per_query = summary.pop("per_query")
        section = {  # the layout of engine.evaluate_lds's section, so records and comparisons read it alike
            **summary, "per_query": [None if not np.isfinite(v) else round(float(v), 6) for v in per_query],
            "measurement": self.measurement, "queries": int(arr.shape[0]), "queries_available": int(arr.shape[0]),
            "query_columns": None, "subsets": int(gt.masks.shape[0]), "replicas": self.replicas, "ensemble": 1,
            "explained": self.explained.reference, "noise_ceiling": ceiling}
        if split == REPORTED:
            section["ground_truth"] = records.gt_reference(self.store, gt.root, self.replicas,
                                                           self.explained.ground_truth_models)
            section["ground_truth"]["target_sha256"] = section["target_sha256"] = records.target_hash(gt, section)
        return LDSResult(self.setting.name, split, section)

    @property
    def mislabel(self) -> MislabelBench:
        """The leaderboard's corrupted-label model and its training set (loaded and verified on first use)."""
        if self._mislabel is None:
            self._mislabel = MislabelBench(self, mislabel_mod.load(self.store, self.setting, records.MISLABEL_SPEC))
        return self._mislabel

    def evaluate_mislabel(self, self_scores) -> MislabelResult:
        """Recall at 10..50% inspected and ROC AUC of (N,) self-influence scores of the corrupted-label model's
        training points (largest first), beside the random and training-loss orders."""
        mis = self.mislabel
        art = mis._artifact
        arr = check_self_scores(self_scores, len(art.labels))
        section = metrics.mislabel(arr, art.flipped)
        section["definition"] = "self-influence scores of the corrupted-label model's training points, largest first"
        section["artifact"] = records.mislabel_reference(self.store, art)
        return MislabelResult(self.setting.name, section, {k: v for k, v in mis.baselines().items()})

    # -- against the leaderboard ---------------------------------------------------------------
    def compare(self, result, row: str) -> Comparison:
        """``result`` (from :meth:`evaluate` or :meth:`run`) against leaderboard ``row`` ("ekfac", "trak-ens8", an
        external row), paired query by query (:func:`records.unpaired_reasons`, :func:`metrics.paired_difference`)."""
        result = result.lds if isinstance(result, RunResult) else result
        if not isinstance(result, LDSResult):
            raise TypeError(f"compare takes what bench.evaluate or bench.run returned, not a {type(result).__name__}")
        if result.split != REPORTED:
            raise RunError("a validation result is for tuning; the leaderboard reports the reported queries: compare "
                           "what bench.evaluate returns")
        base, n = records.parse_row_name(row)
        rec = records.read_record(self.store, self.setting.name, base, n)
        if rec is None or not rec.get("lds") or rec["lds"].get("mean") is None:
            have = sorted(p.stem for p in (self.store.runs / self.setting.name).glob("*.json"))
            raise RunError(f"no LDS for row {row!r} on {self.setting.name} "
                           f"({self.store.relative(records.run_path(self.store, self.setting.name, base, n))}); rows "
                           f"with records: {', '.join(have) or 'none'}")
        method = method_of(rec, self._resolve)
        stale = (records.stale_reasons(rec, self.store, self.setting, method).get("lds", []) if method is not None
                 else ["no solver file defines it here: its record cannot be checked"])
        why = records.unpaired_reasons(result.section, rec["lds"])
        paired = None if why else metrics.paired_difference(result.section["per_query"], rec["lds"]["per_query"])
        return Comparison(self.setting.name, row, result, rec["lds"], why, stale, paired)

    def run(self, cls: type[Solver], params: dict | None = None, *, search: bool = True, write: bool = False,
            log=print) -> RunResult:
        """Evaluate a Solver subclass — defined in a script or notebook, no file in solvers/ needed — through the
        engine exactly as the leaderboard's rows are (grid search on validation queries, LDS on the reported ones,
        mislabel detection with the chosen parameters). ``write``: also write its run record into the results."""
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"bench.run takes a Solver subclass (the class itself), not {cls!r}")
        if not cls.name:
            raise RunError(f"{cls.__name__} has no name: set `name = \"my-method\"` (its record and row are named "
                           f"by it)")
        taken = registry.available().get(cls.name)
        if cls.name in BASELINES or (taken is not None and taken is not cls):
            raise RunError(f"{cls.__name__}.name {cls.name!r} is already the name of a "
                           f"{'baseline' if taken is None else 'registered solver'}; give your solver another name")
        record = records.run(self.store, self.setting, cls, params, search=search, explain=self.explained.source,
                             write=write, device=self.device, log=log)
        return RunResult(self.setting.name, record, records.run_path(self.store, self.setting.name, cls.name)
                         if write else None)


# ---------------------------------------------------------------- checking what a user hands in

def _array(scores, what: str) -> np.ndarray:
    """``scores`` (numpy, torch, a ScoresFile, nested lists) as a numpy array of real numbers (not copied if it is)."""
    if isinstance(scores, ScoresFile):
        scores = scores.array
    if isinstance(scores, torch.Tensor):
        t = scores.detach().cpu()
        scores = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    arr = np.asarray(scores)
    if arr.dtype.kind not in "fiu":
        raise ScoresError(f"{what} of dtype {arr.dtype} are not real numbers; give floating-point scores")
    return arr


def _check_finite(arr: np.ndarray, what: str, per: str) -> None:
    bad = ~np.isfinite(arr) if arr.dtype.kind == "f" else None
    if bad is not None and bad.any():
        rows = np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))
        raise ScoresError(f"{what} hold {int(bad.sum())} non-finite values (NaN or inf) in {len(rows)} {per} (first: "
                          f"row {rows[0]}); every score must be finite: fix the method (e.g. more damping) or the file")


def check_scores(scores, bench: Bench, split: str) -> np.ndarray:
    """``scores`` as a (Q, N) array of the ``split`` queries, or a :class:`ScoresError` saying what is wrong and what
    to do: a vector, a transposed matrix, the other split's matrix, another shape, non-finite values."""
    other = VALIDATION if split == REPORTED else REPORTED
    what = f"scores for {bench.setting.name}'s {split} queries"
    arr = _array(scores, what)
    want, theirs = bench.expected_shape(split), bench.expected_shape(other)
    order = (f"(Q, N) = {want}: one row per {split} query in the order of bench.queries.{split}.indices and one "
             f"column per training point in the setting's training order")
    got = tuple(arr.shape)
    if got != want:
        if arr.ndim == 1:
            raise ScoresError(f"{what}: got a vector of shape {got}, expected a matrix {order}; self-influence scores "
                              f"(one per training point) go to bench.evaluate_mislabel or `--self-scores`")
        if arr.ndim != 2:
            raise ScoresError(f"{what}: got a {arr.ndim}-D array of shape {got}, expected {order}")
        if got == want[::-1] and want[0] != want[1]:
            raise ScoresError(f"{what}: got shape {got}, the transpose of the expected {order}; pass the transpose "
                              f"(scores.T)")
        use = "bench.evaluate" if other == REPORTED else "bench.evaluate_validation (or `--validation`)"
        if got == theirs:
            hint = ("tune on them with bench.evaluate_validation (or `--validation`), and evaluate the reported "
                    "queries once you have chosen" if other == VALIDATION else f"evaluate them with {use}")
            raise ScoresError(f"{what}: got shape {got}, which is the {other} queries' (Q, N); {hint}")
        if got == theirs[::-1]:
            raise ScoresError(f"{what}: got shape {got}, the transpose of the {other} queries' matrix {theirs}; "
                              f"expected {order}")
        raise ScoresError(f"{what}: got shape {got}, expected {order}; recompute them for exactly those queries and "
                          f"training points")
    _check_finite(arr, what, "queries")
    return arr


def check_self_scores(self_scores, n: int) -> np.ndarray:
    """(N,) self-influence scores, or a :class:`ScoresError` saying what is wrong and what to do."""
    what = "self-influence scores of the corrupted-label model's training points"
    arr = _array(self_scores, what)
    if arr.shape != (n,):
        if arr.ndim == 2 and 1 in arr.shape and arr.size == n:
            raise ScoresError(f"{what}: got shape {arr.shape}, expected a vector ({n},); pass scores.ravel()")
        raise ScoresError(f"{what}: got shape {arr.shape}, expected ({n},): one score per training point in the "
                          f"setting's training order" + ("; a (Q, N) matrix goes to bench.evaluate or `--scores`"
                                                          if arr.ndim == 2 else ""))
    _check_finite(arr.reshape(-1, 1), what, "training points")
    return arr


# ---------------------------------------------------------------- score files from other programs

@dataclass(frozen=True, eq=False)
class ScoresFile:
    """A score array read from a file, with the file's sha256 (recorded with the numbers)."""

    path: Path
    sha256: str
    format: str
    array: np.ndarray

    def reference(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "format": self.format,
                "shape": list(self.array.shape), "dtype": str(self.array.dtype)}


def _one_tensor(path: Path, tensors: dict, what: str):
    """The one tensor of a mapping, or the one named "scores"."""
    if "scores" in tensors:
        return tensors["scores"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ScoresError(f"{path} holds {len(tensors)} {what} ({', '.join(map(str, list(tensors)[:5]))}); save the score "
                      f"matrix alone, or under the name 'scores'")


def load_scores(path) -> ScoresFile:
    """A score array from ``.npy`` (numpy.save), ``.pt`` (torch.save of one tensor) or ``.safetensors`` (one tensor,
    or the one named "scores"); a :class:`ScoresError` for any other file."""
    path = Path(path).expanduser()
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ScoresError(f"{path}: a {path.suffix or 'suffix-less'} file; give the scores as .npy (numpy.save), .pt "
                          f"(torch.save of one tensor) or .safetensors")
    if not path.is_file():
        raise ScoresError(f"{path}: no such file")
    try:
        if kind == "npy":
            with path.open("rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise ValueError("no .npy header")
            obj = np.load(path, allow_pickle=False)
        elif kind == "pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = _one_tensor(path, obj, "entries")
            if not isinstance(obj, torch.Tensor):
                raise ScoresError(f"{path} holds a {type(obj).__name__}, not a tensor; torch.save the score matrix "
                                  f"itself")
        else:
            from safetensors.torch import load_file

            obj = _one_tensor(path, load_file(str(path)), "tensors")
    except ScoresError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader's own error (pickle, header, zip) means "not that kind"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScoresError(f"{path} is not a {kind} file holding a score array ({first}); write it with "
                          f"{WRITERS[kind]}") from None
    return ScoresFile(path, sha256_file(path), kind, _array(obj, f"the scores in {path}"))


# ---------------------------------------------------------------- run records of external scores

def is_external(record: dict | None) -> bool:
    return bool(record) and (record.get("external") or {}).get("kind") == EXTERNAL


def external_method(name: str) -> Baseline:
    """What :func:`records.stale_reasons` checks an external record with: like a baseline it has no solver code to
    fingerprint, so its ground truth, target, explained model and metric code are what keep it current."""
    return Baseline(name, EXTERNAL)


def method_of(record: dict, resolve=None):
    """The method a record's staleness is checked with: the external marker for external scores, else ``resolve``'s
    class for its solver name; None where no solver file defines it (its record cannot be checked)."""
    if is_external(record):
        return external_method(record["solver"])
    if resolve is None:
        return None
    try:
        return resolve(record["solver"])
    except (KeyError, SolverError):
        return None


def check_name(store: ResultsStore, setting: settings_mod.Setting, name: str) -> None:
    """Refuse a row name that a solver, a baseline or another kind of record owns, or that is no file name."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RunError(f"--name {name!r}: use 1-64 letters, digits and . _ + -, starting with a letter or digit")
    if records.parse_row_name(name)[1] > 1:
        raise RunError(f"--name {name!r} ends like an ensemble row (-ens<n>); choose another name")
    if name in BASELINES or name in registry.available():
        raise RunError(f"--name {name!r} is the name of a {'baseline' if name in BASELINES else 'registered solver'}; "
                       f"external scores get a row of their own: choose another name")
    path = records.run_path(store, setting.name, name)
    if path.is_file():
        try:
            old = records.read_record(store, setting.name, name)
        except records.RecordError:
            old = None
        if not is_external(old):
            raise RunError(f"{store.relative(path)} is not a record of external scores; choose another --name")


def _plain(obj):
    """JSON-ready: plain Python numbers, NaN/inf as null (as run records store them)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_record(bench: Bench, name: str, lds: LDSResult, scores: ScoresFile, *,
                 mislabel: MislabelResult | None = None, self_scores: ScoresFile | None = None) -> Path:
    """Write the sealed run record ``runs/<setting>/<name>.json`` of external scores: the LDS of the reported queries
    (and mislabel detection from self-influence scores), each file's sha256, and what keeps the numbers current (the
    ground truth, target and explained model they were scored against, the metric code's fingerprint)."""
    if lds.split != REPORTED:
        raise RunError("validation scores are for tuning and never become a leaderboard record; evaluate the "
                       "reported queries' scores")
    store, setting = bench.store, bench.setting
    check_name(store, setting, name)
    store.check_writable(store.runs / setting.name)
    marker = external_method(name)
    not_checked = ("external scores: computed and tuned by whoever submitted them; the benchmark checked their shape "
                   "and computed the metrics, and cannot check which queries chose their hyper-parameters")
    record = {"format": records.RUN_FORMAT, "setting": setting.name, "solver": name,
              "external": {"kind": EXTERNAL, "note": not_checked, "scores": scores.reference()}}
    record["lds"] = {**lds.section, "params": None, "selection": {"searched": False, "method": not_checked},
                     "fingerprint": records.section_fingerprint(marker, None), "cost": {}}
    if mislabel is not None:
        if self_scores is not None:
            record["external"]["self_scores"] = self_scores.reference()
        record["mislabel"] = {**mislabel.section, "params": None, "params_source": not_checked,
                              "fingerprint": records.section_fingerprint(marker, None), "cost": {}}
    record.update({"params": None, "device": None, "environment": environment("cpu"), "code_version": code_version(),
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "cost": {"fit_s": None, "score_s": None, "self_score_s": None, "peak_mb": None}})
    path = records.run_path(store, setting.name, name)
    write_json(path, records.seal(_plain(record)))
    records.read_record(store, setting.name, name)  # what was written checks against itself, as every reader will
    return path


__all__ = ["Bench", "Comparison", "EXTERNAL", "Examples", "LDSResult", "MislabelBench", "MislabelResult", "Queries",
           "QuerySplits", "RunResult", "ScoresError", "ScoresFile", "check_name", "check_scores", "check_self_scores",
           "external_method", "is_external", "load_scores", "method_of", "write_record"]
