"""Floor 3: counterfactual retraining — models retrained with the explained model's recipe on a modified training
set (points removed, or relabelled), several seeds each, as a versioned, resumable artifact.

Remove-top-k and unlearning (:mod:`benchmark.studies.counterfactual`, :mod:`benchmark.studies.unlearning`) ask
what retraining *really* does when the training set changes; this module answers with trained models, with the
ground truth's discipline: a manifest with the recipe hash and every file's sha256, units written atomically, a
lock, half-written files of a killed build removed, jobs run through any executor (local processes or Ray), and
the finished artifact's root hash pinned in the store's index.

An *experiment* is (kind, indices, new labels): ``remove`` trains without the points ``indices``, ``relabel``
trains on every point with ``labels`` in place of the labels at ``indices``. It is named by its content, so two
questions that ask for the same training set (two solvers with the same top-k) share its models. A *unit* is
(experiment, seed j): seed j is the seed of the base's model j, so the model retrained with seed j is compared
with the full-data model of the same seed (the ``reference`` experiment: nothing removed, trained here too), the
seed-matched difference, apart from the noise between seeds. Seed 0 is the explained model's own seed.

The *base* is the training set the explained model saw: the setting's labels and its ground truth's full-data
models (``clean``), or the corrupted labels and models of its mislabel artifact (``mislabel``).

Artifact layout (``<store>/<family>/<setting>/<version>/``, family ``counterfactual`` or ``unlearning``)::

    manifest.json            kind "retrain", setting, spec {base, seeds, evaluation sha256, predictions, parameters},
                             recipe + hash, data, base {labels sha256, seeds, source artifact + root hash},
                             experiments {id: {kind, size}}, files {path: sha256}, units done / total, complete
    train_labels.npy         (N,) uint8: the base's training labels, which experiments modify
    evaluation.npy           (E,) int64: the test indices whose margins every model records
    plan.json                {tag: experiment id}: which question each experiment answers (append-only)
    experiments/{id}.npz     kind, indices (sorted int64), labels (relabel: the new labels at indices)
    units/{id}/s{j}.npz      margins (E,) float32 and correct (E,) bool at the evaluation points, test_accuracy,
                             seconds, seed, hardware; with the spec's ``predictions`` the (T,) uint8 predicted class
                             of every test point, with ``parameters`` the (P,) float32 flat parameters
                             (``named_parameters`` order; only where a study needs them)

A version is identified by (recipe hash, base, seeds, evaluation points, what a unit records); experiments only
grow, each unit is written once, and ``complete`` means every unit of every listed experiment is there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.params import ParamLayout
from ..setup import settings as settings_mod
from ..setup.artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, ArtifactLock, code_version, environment,
                               file_hashes, hardware, read_json, remove_stale_temporaries, save_npy, save_npz,
                               sha256_bytes, version_folders, write_json)
from ..setup.config import Unit, stable_hash, unit_seed
from ..setup.store import ResultsStore
from . import index
from .artifact import GroundTruth
from .mislabel import MislabelArtifact, model_seed
from .mislabel import Spec as MislabelSpec

KINDS = ("remove", "relabel")
REFERENCE = "reference"  # the plan's tag of the full-data experiment (nothing removed)
BASES = ("clean", "mislabel")


# ---------------------------------------------------------------- experiments

@dataclass(frozen=True, eq=False)
class Experiment:
    """A modified training set: ``remove`` the points ``indices``, or ``relabel`` them with ``labels``."""

    kind: str
    indices: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"experiment kind must be one of {KINDS}, got {self.kind!r}")
        idx = np.asarray(self.indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError("experiment indices must be a 1-D array of training indices")
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        if len(np.unique(idx)) != len(idx):
            raise ValueError("experiment indices repeat a training point")
        labels = None
        if self.kind == "relabel":
            if self.labels is None or len(self.labels) != len(idx):
                raise ValueError("a relabel experiment needs one new label per index")
            labels = np.asarray(self.labels, dtype=np.int64)[order]
        elif self.labels is not None:
            raise ValueError("a remove experiment takes no labels")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def reference(cls) -> "Experiment":
        return cls("remove", np.zeros(0, dtype=np.int64))

    @property
    def id(self) -> str:
        """Content name: equal experiments (the same training set) have the same id."""
        parts = [self.kind, sha256_bytes(self.indices.tobytes())]
        if self.labels is not None:
            parts.append(sha256_bytes(self.labels.tobytes()))
        return stable_hash(parts, 16)

    @property
    def size(self) -> int:
        return len(self.indices)

    def training_set(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices to train on or None for all, labels) for ``train``."""
        n = len(labels)
        if len(self.indices) and (self.indices[0] < 0 or self.indices[-1] >= n):
            raise ArtifactError(f"experiment {self.id} names training points outside 0..{n - 1}")
        if self.kind == "relabel":
            y = labels.clone()
            y[torch.from_numpy(self.indices)] = torch.from_numpy(self.labels).to(y.dtype)
            return None, y
        if not len(self.indices):
            return None, labels
        keep = np.ones(n, dtype=bool)
        keep[self.indices] = False
        return torch.from_numpy(np.flatnonzero(keep)), labels

    def save(self, path: Path) -> None:
        arrays = {"kind": np.asarray(self.kind), "indices": self.indices}
        if self.labels is not None:
            arrays["labels"] = self.labels
        save_npz(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> "Experiment":
        with np.load(path) as z:
            return cls(str(z["kind"]), z["indices"], z["labels"] if "labels" in z.files else None)


# ---------------------------------------------------------------- the base

@dataclass(frozen=True)
class Base:
    """The training set the explained model saw and the seeds of its models (seed j = the seed of model j)."""

    name: str
    labels: np.ndarray  # (N,) int64
    seeds: tuple[int, ...]
    source: dict  # the artifact the explained model comes from: path, version, root hash

    def record(self) -> dict:
        return {"name": self.name, "labels_sha256": sha256_bytes(self.labels.astype(np.uint8).tobytes()),
                "seeds": list(self.seeds), "source": self.source}


def clean_base(store: ResultsStore, gt: GroundTruth, seeds: int) -> Base:
    """The setting's own labels; seed j is the seed of the ground truth's full-data model j (replica j's)."""
    labels = gt.setting.data().train_y.numpy().astype(np.int64)
    return Base("clean", labels, tuple(unit_seed(gt.protocol, Unit(j, None)) for j in range(seeds)),
                {"path": store.relative(gt.root), "version": gt.manifest["version"], "root_hash": gt.root_hash(),
                 "explained": "full-data model 0"})


def mislabel_base(store: ResultsStore, art: MislabelArtifact, seeds: int) -> Base:
    """The corrupted labels of a mislabel artifact; seed j is the seed its model j has (or would have)."""
    spec = MislabelSpec(**art.manifest["spec"])
    return Base("mislabel", art.labels.numpy().astype(np.int64),
                tuple(model_seed(art.setting.name, spec, j) for j in range(seeds)),
                {"path": store.relative(art.root), "version": art.manifest["version"], "root_hash": art.root_hash(),
                 "explained": "corrupted-label model 0"})


# ---------------------------------------------------------------- training one job (runs in workers)

@dataclass(frozen=True)
class RetrainUnit:
    experiment: str
    seed_index: int

    @property
    def name(self) -> str:
        return f"{self.experiment}/s{self.seed_index}"


def unit_path(root: Path, unit: RetrainUnit) -> Path:
    return Path(root) / "units" / unit.experiment / f"s{unit.seed_index}.npz"


def experiment_path(root: Path, experiment_id: str) -> Path:
    return Path(root) / "experiments" / f"{experiment_id}.npz"


@dataclass(frozen=True)
class RetrainJob:
    """Units to train one after another in one worker, with what it needs (the Setting pickles by name)."""

    setting: settings_mod.Setting
    root: str
    seeds: tuple[int, ...]
    units: tuple[RetrainUnit, ...]
    predictions: bool = False
    parameters: bool = False
    device: str = "cpu"
    threads: int = 0

    def finished_part(self) -> tuple[list[dict], "RetrainJob"]:
        """Summaries of units a dead attempt already wrote, and the job for the rest (Ray retries)."""
        done, todo = [], []
        for u in self.units:
            path = unit_path(Path(self.root), u)
            if path.is_file():
                with np.load(path) as z:
                    done.append({"unit": u.name, "seconds": float(z["seconds"]),
                                 "test_accuracy": float(z["test_accuracy"]), "already_done": True})
            else:
                todo.append(u)
        return done, dataclasses.replace(self, units=tuple(todo))


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(T,) predicted class of every row of ``x``."""
    model.eval()
    return torch.cat([model(x[i:i + chunk]).argmax(-1).cpu() for i in range(0, len(x), chunk)])


def flat_parameters(model: torch.nn.Module) -> np.ndarray:
    """(P,) float32 parameters in ``named_parameters`` order (the solvers' flat layout)."""
    named = dict(model.named_parameters())
    return ParamLayout.of(model).flatten({k: v.detach().cpu() for k, v in named.items()}).float().numpy()


def run_retrain_job(job: RetrainJob) -> list[dict]:
    from ..setup.training import evaluate, train

    if job.threads:
        torch.set_num_threads(job.threads)
    root, device = Path(job.root), torch.device(job.device)
    data = job.setting.data()
    labels = torch.from_numpy(np.load(root / "train_labels.npy").astype(np.int64))
    evaluation = torch.from_numpy(np.load(root / "evaluation.npy"))
    x, ex, ey = data.train_x.to(device), data.test_x[evaluation].to(device), data.test_y[evaluation].to(device)
    tx, ty = data.test_x.to(device), data.test_y
    hw = np.asarray(json.dumps(hardware(device), sort_keys=True))
    out = []
    for unit in job.units:
        exp = Experiment.load(experiment_path(root, unit.experiment))
        indices, y = exp.training_set(labels)
        seed = job.seeds[unit.seed_index]
        t0 = time.perf_counter()
        model = train(job.setting.model(seed), x, y.to(device), job.setting.recipe, seed, indices)
        seconds = time.perf_counter() - t0
        predicted = predict(model, tx)
        acc = float((predicted == ty).float().mean())
        ev = evaluate(model, ex, ey)
        arrays = {"margins": ev["margin"].numpy().astype(np.float32), "correct": ev["correct"].numpy(),
                  "test_accuracy": np.float64(acc), "seconds": np.float64(seconds), "seed": np.int64(seed),
                  "hardware": hw}
        if job.predictions:
            arrays["predictions"] = predicted.numpy().astype(np.uint8)
        if job.parameters:
            arrays["parameters"] = flat_parameters(model)
        save_npz(unit_path(root, unit), **arrays)
        out.append({"unit": unit.name, "seconds": seconds, "test_accuracy": acc})
    return out


# ---------------------------------------------------------------- the artifact

@dataclass
class Retrained:
    """An opened retraining artifact: its plan, experiments and the outputs of every unit done."""

    root: Path
    manifest: dict
    setting: settings_mod.Setting

    @classmethod
    def open(cls, store: ResultsStore, root: Path, setting: settings_mod.Setting, verify: bool = True) -> "Retrained":
        man = index.open_manifest(store, root, "retrain", "retraining", setting,
                                  "rerun the study: it retrains into a new version",
                                  "delete the damaged files listed above and rerun the study: it retrains exactly "
                                  "the missing units" if verify else None)
        return cls(Path(root), man, setting)

    @property
    def seeds(self) -> list[int]:
        return list(self.manifest["base"]["seeds"])

    @property
    def plan(self) -> dict[str, str]:
        path = self.root / "plan.json"
        return read_json(path) if path.is_file() else {}

    @property
    def evaluation(self) -> np.ndarray:
        return np.load(self.root / "evaluation.npy")

    @property
    def train_labels(self) -> np.ndarray:
        return np.load(self.root / "train_labels.npy").astype(np.int64)

    def experiment(self, experiment_id: str) -> Experiment:
        return Experiment.load(experiment_path(self.root, experiment_id))

    def done(self, experiment_id: str, j: int) -> bool:
        return str(unit_path(self.root, RetrainUnit(experiment_id, j)).relative_to(self.root)) in self.manifest["files"]

    def unit(self, experiment_id: str, j: int) -> dict:
        """Everything unit (experiment, seed j) recorded, as numpy arrays and numbers."""
        if not self.done(experiment_id, j):
            raise ArtifactError(f"{self.root}: unit {experiment_id}/s{j} has not been trained yet; rerun the study "
                                f"(it resumes)")
        with np.load(unit_path(self.root, RetrainUnit(experiment_id, j))) as z:
            return {k: (z[k] if z[k].ndim else z[k].item()) for k in z.files if k != "hardware"}

    def root_hash(self) -> str:
        return index.root_hash(self.manifest)

    def reference(self) -> dict:
        return {"path": str(self.root), "version": self.manifest["version"], "root_hash": self.root_hash(),
                "complete": self.manifest["complete"]}


def spec_key(setting: settings_mod.Setting, base: Base, evaluation: np.ndarray, predictions: bool,
             parameters: bool) -> str:
    return stable_hash({"recipe": setting.recipe_hash(), "base": base.record()["labels_sha256"],
                        "base_name": base.name, "seeds": list(base.seeds),
                        "evaluation": sha256_bytes(np.asarray(evaluation, dtype=np.int64).tobytes()),
                        "predictions": predictions, "parameters": parameters})


def versions(family: Path, setting: settings_mod.Setting) -> list[Path]:
    return version_folders(Path(family) / setting.name)


def _listed_units(man: dict) -> list[RetrainUnit]:
    return [RetrainUnit(e, j) for j in range(len(man["base"]["seeds"])) for e in man["experiments"]]


def _refresh(root: Path, man: dict, hash_cache: dict) -> dict:
    """Re-list the files with their sha256 (cached by name: units and experiments are written once)."""
    names = ["train_labels.npy", "evaluation.npy"] + (["plan.json"] if (root / "plan.json").is_file() else [])
    names += [str(experiment_path(root, e).relative_to(root)) for e in man["experiments"]]
    units = _listed_units(man)
    done = [u for u in units if unit_path(root, u).is_file()]
    names += [str(unit_path(root, u).relative_to(root)) for u in done]
    hash_cache.pop("plan.json", None)  # the plan grows
    hash_cache.update(file_hashes(root, [n for n in names if n not in hash_cache]))
    man.update(files={n: hash_cache[n] for n in sorted(names)}, units_total=len(units), units_done=len(done),
               complete=len(done) == len(units))
    write_json(root / MANIFEST, man)
    return man


def prepare(setting: settings_mod.Setting, base: Base, evaluation: np.ndarray, *, store: ResultsStore, family: Path,
            predictions: bool = False, parameters: bool = False, log=print) -> Retrained:
    """Find the version for (setting, base, evaluation points, what a unit records), or create it with its
    ``reference`` experiment; returns it opened (possibly with units still to train)."""
    evaluation = np.asarray(evaluation, dtype=np.int64)
    store.check_writable(family)
    key = spec_key(setting, base, evaluation, predictions, parameters)
    found = [p for p in versions(family, setting)
             if (p / MANIFEST).is_file() and read_json(p / MANIFEST).get("spec_key") == key]
    if found:
        return Retrained.open(store, found[-1], setting)
    existing = versions(family, setting)
    root = Path(family) / setting.name / f"v{int(existing[-1].name[1:]) + 1 if existing else 1}"
    tmp = root.with_name(f".{root.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_npy(tmp / "train_labels.npy", base.labels.astype(np.uint8))
    save_npy(tmp / "evaluation.npy", evaluation)
    ref = Experiment.reference()
    ref.save(experiment_path(tmp, ref.id))
    write_json(tmp / "plan.json", {REFERENCE: ref.id})
    man = {"format_version": FORMAT_VERSION, "kind": "retrain", "setting": setting.name, "version": root.name,
           "complete": False, "spec_key": key,
           "spec": {"base": base.name, "seeds": len(base.seeds), "evaluation_points": len(evaluation),
                    "evaluation_sha256": sha256_bytes(evaluation.tobytes()), "predictions": predictions,
                    "parameters": parameters},
           "base": base.record(), "recipe": setting.recipe_record(), "recipe_hash": setting.recipe_hash(),
           "data": setting.data_spec.to_dict(),
           "seeds": "seed j: the seed of the base's model j (j = 0: the explained model's own)",
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "code_version": code_version(),
           "environment": {}, "experiments": {ref.id: {"kind": ref.kind, "size": 0}}, "files": {}}
    _refresh(tmp, man, {})
    os.replace(tmp, root)  # the version appears whole, with its base and reference, or not at all
    log(f"new retraining artifact {store.relative(root)} ({base.name} labels, {len(base.seeds)} seeds, "
        f"{len(evaluation)} evaluation points)")
    return Retrained.open(store, root, setting)


def build(art: Retrained, experiments: dict[str, Experiment] | None = None, *, store: ResultsStore, executor=None,
          device: str | None = None, units_per_job: int = 1, max_units: int | None = None, progress: bool = True,
          log=print) -> Retrained:
    """Add ``experiments`` ({tag: experiment}) to the plan and train every missing unit of the artifact (seed 0
    of every experiment first). Resumable; ``max_units`` stops early (the artifact stays incomplete). The
    artifact's root hash is pinned whenever units land, and returned re-opened and verified."""
    from tqdm.auto import tqdm

    from ..setup.training import default_device
    from .executors import LocalExecutor

    root, setting = art.root, art.setting
    device = device or str(default_device())
    with ArtifactLock(root):
        for stale in remove_stale_temporaries(root):
            log(f"removed a half-written file of an interrupted build: {stale.relative_to(root)}")
        man = read_json(root / MANIFEST)
        index.check(store, root, index.root_hash(man))  # refuse to extend an artifact changed behind our back
        plan = read_json(root / "plan.json")
        added = 0
        for tag, exp in (experiments or {}).items():
            if tag in plan and plan[tag] != exp.id:
                raise ArtifactError(f"{root}: the plan already answers {tag!r} with experiment {plan[tag]}, not "
                                    f"{exp.id}; a plan only grows (read it with Retrained.plan before planning)")
            if exp.id not in man["experiments"]:
                if exp.size and exp.indices[-1] >= len(art.train_labels):
                    raise ValueError(f"experiment {tag!r} names training points beyond the {len(art.train_labels)} "
                                     f"the base has")
                exp.save(experiment_path(root, exp.id))
                man["experiments"][exp.id] = {"kind": exp.kind, "size": exp.size}
                added += 1
            plan[tag] = exp.id
        if plan != read_json(root / "plan.json"):
            write_json(root / "plan.json", plan)
        hash_cache = dict(man.get("files", {}))
        _refresh(root, man, hash_cache)
        ref = plan[REFERENCE]
        pending = [u for u in _listed_units(man) if not unit_path(root, u).is_file()]
        pending.sort(key=lambda u: (u.experiment != ref, u.seed_index))  # references, then seed 0 of everything
        if max_units is not None:
            pending = pending[:max_units]
        executor = executor or LocalExecutor.auto(torch.device(device), "loop")
        if pending:  # where the models are trained (each unit records its hardware too)
            man["environment"] = environment(device, executor=executor.describe())
        log(f"{store.relative(root)}: {len(man['experiments'])} experiments ({added} new) x {len(art.seeds)} seeds; "
            f"{man['units_done']}/{man['units_total']} units done; training {len(pending)} on {device} "
            f"({executor.describe()})")
        spec = man["spec"]
        jobs = [RetrainJob(setting, str(root), tuple(art.seeds), tuple(pending[i:i + units_per_job]),
                           spec["predictions"], spec["parameters"], device, executor.threads_per_worker)
                for i in range(0, len(pending), units_per_job)]
        bar = tqdm(total=len(pending), desc=f"retrain {setting.name}", unit="model", disable=not progress)
        try:
            for results in executor.run(run_retrain_job, jobs):
                bar.update(len(results))
                bar.set_postfix(acc=f"{results[-1]['test_accuracy']:.4f}")
                _refresh(root, man, hash_cache)
        finally:
            bar.close()
            _refresh(root, man, hash_cache)
            if index.pinned(store, root) != index.root_hash(man):  # experiments only grow: pinned as they land
                index.pin(store, root, index.root_hash(man), "retraining")
    log(f"{store.relative(root)}: {man['units_done']}/{man['units_total']} units"
        + (" (complete)" if man["complete"] else "; rerun to continue"))
    return Retrained.open(store, root, setting)
