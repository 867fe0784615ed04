"""Floor 3: the explained-model zoo: full-data models by seed, each with its per-epoch checkpoints and learning rates,
in an artifact of their own, apart from the ground truth.

Solvers that explain several models (ensembles, TRAK) or a training trajectory (TracIn, SOURCE) need more
than the K full-data models a ground truth holds, and asking the ground truth for more would make a new
ground-truth version and stale every run. The zoo grows on its own: model k of a setting is fixed by
(recipe, base seed, k), is trained once, and adding models never changes the ones already there.

Zoo seeds never coincide with a seed of the setting's ground-truth models (checked before training): an
explained model must be independent of the target it is scored against (docs/protocol.md, Conventions).

Artifact layout (``<store>/models/<setting>/<version>/``)::

    manifest.json              kind "zoo", setting, spec {models, base_seed}, recipe + hash, data sha256,
                               files {path: sha256}, per-model summaries (seed, test accuracy, seconds, hardware)
    k{k}/epoch_{e}.safetensors model k after e epochs (e = 0: its initialisation; e = E: the final model)
    k{k}/summary.npz           seed, seconds, test_accuracy, lr (E, steps): the learning rate of every SGD step

One version per (setting recipe, base seed); ``models`` only grows. A model is written atomically file by file,
its summary last, so an interrupted build resumes at the first model without a summary.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..setup import settings as settings_mod
from ..setup.artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, ArtifactLock, code_version, environment,
                               file_hashes, hardware, load_safetensors, read_json, remove_stale_temporaries, save_npz,
                               save_safetensors, version_folders, write_json)
from ..setup.config import Protocol, stable_hash, unit_seed
from ..setup.store import ResultsStore
from . import index
from .protocol import all_units


@dataclass(frozen=True)
class ZooSpec:
    models: int = 8
    base_seed: int = 0

    def __post_init__(self):
        if self.models < 1:
            raise ValueError(f"a zoo holds at least one model, got models={self.models}")


def zoo_seed(spec: ZooSpec, k: int) -> int:
    """Model k's seed (initialisation and data order): a hash in the "zoo" namespace, never a replica's."""
    return int(stable_hash([spec.base_seed, "zoo", k], 8), 16)


def model_dir(root: Path, k: int) -> Path:
    return Path(root) / f"k{k:02d}"


def checkpoint_path(root: Path, k: int, epoch: int) -> Path:
    return model_dir(root, k) / f"epoch_{epoch:02d}.safetensors"


def summary_path(root: Path, k: int) -> Path:
    return model_dir(root, k) / "summary.npz"


def model_files(root: Path, k: int, epochs: int) -> list[str]:
    names = [checkpoint_path(root, k, e) for e in range(epochs + 1)] + [summary_path(root, k)]
    return [str(p.relative_to(root)) for p in names]


def ground_truth_seeds(store: ResultsStore, setting: settings_mod.Setting) -> set[int]:
    """Every seed any ground-truth artifact of ``setting`` (or a setting derived from it) trains a model with."""
    seeds: set[int] = set()
    for base in (store.gt, store.gt_studies):
        base = Path(base)
        if not base.is_dir():
            continue
        for folder in base.iterdir():
            if folder.name.partition(settings_mod.DERIVED_SEP)[0] != setting.name:
                continue
            for man_path in folder.glob("v*/" + MANIFEST):
                protocol = Protocol(**read_json(man_path)["protocol"])
                seeds.update(unit_seed(protocol, u) for u in all_units(protocol))
    return seeds


# ---------------------------------------------------------------- training one model (runs in workers)

@dataclass(frozen=True)
class ZooJob:
    setting: settings_mod.Setting
    spec: ZooSpec
    root: str
    k: int
    device: str = "cpu"
    threads: int = 0

    @property
    def units(self) -> tuple:  # what executors report as the job's work
        return (f"k{self.k:02d}",)


def run_zoo_job(job: ZooJob) -> list[dict]:
    from ..setup.training import worker_training

    with worker_training(job.threads):
        return _run_zoo_job(job)


def _run_zoo_job(job: ZooJob) -> list[dict]:
    from ..setup.training import evaluate, train

    setting = job.setting
    data = setting.data()
    device = torch.device(job.device)
    root = Path(job.root)
    seed = zoo_seed(job.spec, job.k)
    rates: list[list[float]] = []

    def checkpoint(epoch, model, schedule):
        if epoch:
            rates.append(schedule)
        save_safetensors(checkpoint_path(root, job.k, epoch), model.state_dict(),
                         {"setting": setting.name, "model": f"k{job.k:02d}", "seed": str(seed), "epoch": str(epoch)})

    t0 = time.perf_counter()
    model = train(setting.model(seed), data.train_x.to(device), data.train_y.to(device), setting.recipe, seed,
                  on_epoch=checkpoint)
    seconds = time.perf_counter() - t0
    acc = float(evaluate(model, data.test_x.to(device), data.test_y.to(device))["correct"].float().mean())
    hw = hardware(device)
    save_npz(summary_path(root, job.k), seed=np.int64(seed), seconds=np.float64(seconds),
             test_accuracy=np.float64(acc), lr=np.asarray(rates, dtype=np.float64),
             hardware=np.asarray(json.dumps(hw, sort_keys=True)))
    return [{"unit": f"k{job.k:02d}", "k": job.k, "seed": seed, "seconds": seconds, "test_accuracy": acc,
             "hardware": hw}]


# ---------------------------------------------------------------- the artifact

def versions(store: ResultsStore, setting: settings_mod.Setting) -> list[Path]:
    return version_folders(store.models / setting.name)


def exists(store: ResultsStore, setting: settings_mod.Setting, min_models: int = 1) -> bool:
    """Whether ``setting`` has a zoo with at least ``min_models`` models trained by its current recipe (read from
    the manifests only; :func:`load` verifies the files)."""
    for path in versions(store, setting):
        man = read_json(path / MANIFEST) if (path / MANIFEST).is_file() else {}
        if man.get("recipe_hash") == setting.recipe_hash() and len(man.get("models") or ()) >= min_models:
            return True
    return False


def _model_done(root: Path, k: int, epochs: int) -> bool:
    return all((Path(root) / name).is_file() for name in model_files(root, k, epochs))


@dataclass
class Zoo:
    """A verified zoo artifact: ``model(k)`` is model k's final weights, ``checkpoint(k, e)`` after epoch e."""

    root: Path
    manifest: dict
    setting: settings_mod.Setting

    @classmethod
    def open(cls, store: ResultsStore, root: Path, setting: settings_mod.Setting, verify: bool = True) -> "Zoo":
        man = index.open_manifest(store, root, "zoo", "model-zoo", setting,
                                  f"build a new zoo with `tdabench zoo {setting.name}`",
                                  f"rebuild the damaged models with `tdabench zoo {setting.name}`" if verify else None)
        return cls(Path(root), man, setting)

    @property
    def epochs(self) -> int:
        return int(self.manifest["recipe"]["train"]["epochs"])

    @property
    def models(self) -> list[int]:
        """The models present (trained and listed), in order."""
        return [m["k"] for m in self.manifest["models"]]

    def _load(self, path: Path) -> torch.nn.Module:
        rel = str(path.relative_to(self.root))
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{self.root}: {rel} is not part of this zoo (models present: {self.models}); "
                                f"train more with `tdabench zoo {self.setting.name} --models N`")
        model = self.setting.model(0)
        model.load_state_dict(load_safetensors(path))
        return model.eval()

    def model(self, k: int) -> torch.nn.Module:
        return self._load(checkpoint_path(self.root, k, self.epochs))

    def checkpoint(self, k: int, epoch: int) -> torch.nn.Module:
        return self._load(checkpoint_path(self.root, k, epoch))

    def learning_rates(self, k: int) -> np.ndarray:
        """(E, steps) learning rate of every SGD step of model k, epoch by epoch."""
        with np.load(summary_path(self.root, k)) as z:
            return z["lr"]

    def root_hash(self) -> str:
        return index.root_hash(self.manifest)

    def reference(self, models: list[int]) -> dict:
        """Identity of the models a run used: the hash of exactly their files (growing the zoo changes nothing)."""
        files = self.manifest["files"]
        used = [n for k in models for n in model_files(self.root, k, self.epochs)]
        return {"setting": self.manifest["setting"], "version": self.manifest["version"],
                "recipe_hash": self.manifest["recipe_hash"], "models": list(models),
                "used_files_hash": stable_hash({n: files.get(n) for n in used})}


def _manifest(setting: settings_mod.Setting, spec: ZooSpec, root: Path) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": "zoo", "setting": setting.name, "version": root.name,
            "complete": False, "spec": dataclasses.asdict(spec), "recipe": setting.recipe_record(),
            "recipe_hash": setting.recipe_hash(), "data": setting.data_spec.to_dict(),
            "seeds": "model k: stable_hash([base_seed, 'zoo', k]); never a ground-truth seed of this setting",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "code_version": code_version(),
            "environment": {}, "models": [], "files": {}}


def _refresh(root: Path, man: dict, epochs: int, hash_cache: dict) -> dict:
    done = [k for k in range(man["spec"]["models"]) if _model_done(root, k, epochs)]
    names = [n for k in done for n in model_files(root, k, epochs)]
    hash_cache.update(file_hashes(root, [n for n in names if n not in hash_cache]))
    summaries = []
    for k in done:
        with np.load(summary_path(root, k)) as z:
            summaries.append({"k": k, "seed": int(z["seed"]), "test_accuracy": round(float(z["test_accuracy"]), 5),
                              "seconds": round(float(z["seconds"]), 2), "hardware": json.loads(str(z["hardware"]))})
    man.update(files={n: hash_cache[n] for n in sorted(names)}, models=summaries,
               complete=len(done) == man["spec"]["models"])
    write_json(root / MANIFEST, man)
    return man


def build(setting: settings_mod.Setting, spec: ZooSpec = ZooSpec(), *, store: ResultsStore, executor=None,
          device: str | None = None, progress: bool = True, log=print) -> Path:
    """Train the zoo's missing models (resumable; more models extend the same version). Returns its folder."""
    from tqdm.auto import tqdm

    from ..setup.training import default_device
    from .executors import LocalExecutor

    store.check_writable(store.models)
    recipe_hash = setting.recipe_hash()
    target = None
    for path in versions(store, setting):
        man = read_json(path / MANIFEST)
        if man.get("recipe_hash") == recipe_hash and man["spec"]["base_seed"] == spec.base_seed:
            target = path
    if target is None:
        existing = versions(store, setting)
        target = store.models / setting.name / f"v{int(existing[-1].name[1:]) + 1 if existing else 1}"
    clash = {zoo_seed(spec, k) for k in range(spec.models)} & ground_truth_seeds(store, setting)
    if clash:
        raise ArtifactError(f"zoo seeds {sorted(clash)} are also ground-truth seeds of {setting.name}: an explained "
                            f"model must be independent of its target; choose another --base-seed")
    device = device or str(default_device())
    with ArtifactLock(target):
        for stale in remove_stale_temporaries(target):
            log(f"removed a half-written file of an interrupted build: {stale}")
        man = read_json(target / MANIFEST) if (target / MANIFEST).is_file() else _manifest(setting, spec, target)
        man["spec"]["models"] = max(man["spec"]["models"], spec.models)
        epochs = setting.recipe.epochs
        hash_cache = dict(man.get("files", {}))
        todo = [k for k in range(man["spec"]["models"]) if not _model_done(target, k, epochs)]
        executor = executor or LocalExecutor.auto(torch.device(device), "loop")
        man["environment"] = environment(device, executor=executor.describe())
        _refresh(target, man, epochs, hash_cache)
        log(f"zoo {target}: {man['spec']['models'] - len(todo)}/{man['spec']['models']} models done; training "
            f"{len(todo)} on {device} ({executor.describe()})")
        jobs = [ZooJob(setting, spec, str(target), k, device, executor.threads_per_worker) for k in todo]
        bar = tqdm(total=len(jobs), desc=f"zoo {setting.name}", unit="model", disable=not progress)
        try:
            for results in executor.run(run_zoo_job, jobs):
                bar.update(len(results))
                bar.set_postfix(last=results[-1]["unit"], acc=f"{results[-1]['test_accuracy']:.4f}")
                _refresh(target, man, epochs, hash_cache)
        finally:
            bar.close()
            _refresh(target, man, epochs, hash_cache)
            if man["models"]:  # the zoo only grows: each finished model is pinned as it lands
                index.pin(store, target, index.root_hash(man), "model zoo")
    log(f"zoo {target}: {len(man['models'])}/{man['spec']['models']} models"
        + (" (complete)" if man["complete"] else "; rerun to continue"))
    return target


def load(store: ResultsStore, setting: settings_mod.Setting, min_models: int = 1) -> Zoo:
    """The newest zoo of ``setting`` built with its current recipe, verified, holding at least ``min_models``."""
    for path in reversed(versions(store, setting)):
        man = read_json(path / MANIFEST)
        if man.get("recipe_hash") == setting.recipe_hash():
            zoo = Zoo.open(store, path, setting)
            if len(zoo.models) < min_models:
                raise ArtifactError(f"{path} holds {len(zoo.models)} model(s); {min_models} needed: train more with "
                                    f"`tdabench zoo {setting.name} --models {min_models}`")
            return zoo
    raise ArtifactError(f"no model zoo for {setting.name} under {store.models / setting.name}; build one with "
                        f"`tdabench zoo {setting.name} --models {max(min_models, 1)}`")
