"""Floor 3: the α-subset models a datamodel regression learns from, trained apart from the evaluation ground truth.

A datamodel (Ilyas et al., *Datamodels*, ICML 2022) predicts a query's output from which training points a model saw:
a ridge regression of the measurement on the subset masks of many retrained models. Its training data are models
like the ground truth's units — α-subsets of the setting's full training set, the setting's recipe — but their
subsets and seeds are drawn in a namespace of their own ("datamodels"), so none coincides with a subset or seed of
any ground truth (checked before training and on every open): the regression is scored against targets it never saw.
Each model records only its margin on the evaluation ground truth's reported and validation queries.

The ground truth's layout (one file per model, three output rows) would take ≈ 18 KB a model, 54 MB and 3,000 files for
3,000 models; here models are written in chunks, margins only: ≈ 6 KB a model plus its packed mask (N/8 bytes).

Artifact layout (``<store>/datamodels/<setting>/<version>/``)::

    manifest.json              kind "datamodel-models", setting, spec {alpha, base_seed, chunk}, models_planned,
                               models_done, chunks_done, complete, recipe + hash, data, evaluation {ground truth path and root hash,
                               sha256 of its query files}, files {path: sha256}, environment, hardware
    queries.npy                (Q,) the evaluation ground truth's reported query indices (a copy)
    validation_queries.npy     (V,) its validation query indices (a copy)
    chunks/c{c:04d}.npz        models c·chunk … (c+1)·chunk − 1: masks (B, ⌈N/8⌉) uint8 bit-packed, margins (B, Q+V)
                               float32 (reported then validation columns), seconds (B,) float64 (training time of
                               each model, in one single-threaded process), seeds (B,) int64, hardware (JSON)

One version per (recipe, alpha, base seed, chunk size, evaluation queries); ``models`` only grows. A chunk is written
atomically once all its models are trained, so an interrupted build resumes at the first missing chunk. The finished
artifact's root hash is pinned in the store's index like every other artifact.
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
                               file_hashes, hardware, hardware_key, read_json, remove_stale_temporaries, save_npy,
                               save_npz, sha256_file, version_folders, write_json)
from ..setup.config import stable_hash
from ..setup.store import ResultsStore
from . import index
from .artifact import GroundTruth
from .zoo import ground_truth_seeds

KIND = "datamodel-models"
NAMESPACE = "datamodels"  # the hash namespace of subsets and seeds: never the ground truth's ("subset", "replica")


@dataclass(frozen=True)
class Spec:
    """Which subset models: ``models`` of them, subsets of size round(alpha·N), ``chunk`` models a file."""

    models: int = 3000
    alpha: float = 0.5
    base_seed: int = 0
    chunk: int = 100

    def __post_init__(self):
        if self.models < 1 or self.chunk < 1:
            raise ValueError(f"datamodel training needs models >= 1 and chunk >= 1, got {self.models}, {self.chunk}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")

    def identity(self) -> dict:
        """What fixes a model's meaning (``models`` only says how many exist)."""
        return {"alpha": self.alpha, "base_seed": self.base_seed, "chunk": self.chunk}


def model_seed(spec: Spec, j: int) -> int:
    """Model j's seed (initialisation and data order): its own, in the datamodels namespace."""
    return int(stable_hash([spec.base_seed, NAMESPACE, "seed", j], 8), 16)


def subset_indices(spec: Spec, n_train: int, j: int) -> np.ndarray:
    rng = np.random.default_rng(int(stable_hash([spec.base_seed, NAMESPACE, "subset", j, n_train], 8), 16))
    return np.sort(rng.choice(n_train, int(round(spec.alpha * n_train)), replace=False))


def subset_masks(spec: Spec, n_train: int, models: range) -> np.ndarray:
    """(len(models), N) bool: which training points each model saw."""
    out = np.zeros((len(models), n_train), dtype=bool)
    for row, j in enumerate(models):
        out[row, subset_indices(spec, n_train, j)] = True
    return out


def chunk_file(root: Path, c: int) -> Path:
    return Path(root) / "chunks" / f"c{c:04d}.npz"


def family(store: ResultsStore, setting: settings_mod.Setting) -> Path:
    return store.root / "datamodels" / setting.name


def assert_independent(masks: np.ndarray, seeds, gt_masks: np.ndarray, gt_seeds) -> None:
    """Refuse subset models that share a subset (identical mask) or a seed with a ground truth: the regression
    would then have seen (part of) the target it is scored against."""
    taken = {np.packbits(m).tobytes() for m in np.asarray(gt_masks, dtype=bool)}
    same_mask = [j for j, m in enumerate(np.asarray(masks, dtype=bool)) if np.packbits(m).tobytes() in taken]
    same_seed = sorted(set(int(s) for s in seeds) & set(int(s) for s in gt_seeds))
    if same_mask or same_seed:
        raise ArtifactError(
            "datamodel training models are not independent of the ground truth: "
            + (f"models {same_mask[:8]} train on a ground-truth subset; " if same_mask else "")
            + (f"seeds {same_seed[:8]} are ground-truth seeds; " if same_seed else "")
            + "choose another --base-seed")


# ---------------------------------------------------------------- the artifact in memory

@dataclass
class SubsetModels:
    """A verified datamodel training artifact: the first ``n`` models' masks, margins and training seconds."""

    root: Path
    manifest: dict
    spec: Spec
    masks: np.ndarray  # (n, N) bool
    margins: np.ndarray  # (n, Q+V) float32
    seconds: np.ndarray  # (n,)
    seeds: np.ndarray  # (n,)
    queries: np.ndarray
    validation_queries: np.ndarray

    @property
    def n(self) -> int:
        return len(self.seconds)

    def outputs(self, split: str) -> np.ndarray:
        q = len(self.queries)
        return self.margins[:, :q] if split == "queries" else self.margins[:, q:]

    def root_hash(self) -> str:
        return index.root_hash(self.manifest)

    @classmethod
    def open(cls, store: ResultsStore, setting: settings_mod.Setting, root: Path, gt: GroundTruth) -> "SubsetModels":
        """Open and check everything: pin, recipe, every file's sha256, each chunk's masks and seeds against what
        the spec derives, the queries against the evaluation ground truth's, and independence from every ground
        truth of the setting."""
        root = Path(root)
        hint = f"rebuild the damaged chunks with `tdabench datamodels {setting.name}` (it retrains only those)"
        man = index.open_manifest(store, root, KIND, "datamodel training", setting,
                                  f"train new ones with `tdabench datamodels {setting.name}`", hint)
        spec = Spec(models=man["models_planned"], **man["spec"])
        q, v = np.load(root / "queries.npy"), np.load(root / "validation_queries.npy")
        if not (np.array_equal(q, gt.queries) and np.array_equal(v, gt.validation_queries)):
            raise ArtifactError(f"{root} records margins on other queries than the ground truth {gt.root}; train new "
                                f"models with `tdabench datamodels {setting.name}`")
        n_train = man["data"]["train_size"]
        masks, margins, seconds, seeds = [], [], [], []
        for c in range(man["chunks_done"]):
            path = chunk_file(root, c)
            with np.load(path) as z:
                idx = range(c * spec.chunk, (c + 1) * spec.chunk)
                m = np.unpackbits(z["masks"], axis=1, count=n_train).astype(bool)
                if not np.array_equal(m, subset_masks(spec, n_train, idx)):
                    raise ArtifactError(f"{path}: its masks are not the subsets the spec derives; {hint}")
                if [int(s) for s in z["seeds"]] != [model_seed(spec, j) for j in idx]:
                    raise ArtifactError(f"{path}: its seeds are not the spec's; {hint}")
                if z["margins"].shape != (spec.chunk, len(q) + len(v)) or not np.isfinite(z["margins"]).all():
                    raise ArtifactError(f"{path}: margins of shape {z['margins'].shape} (or not finite), need "
                                        f"{(spec.chunk, len(q) + len(v))}; {hint}")
                masks.append(m)
                margins.append(z["margins"])
                seconds.append(z["seconds"])
                seeds.append(z["seeds"])
        if not masks:
            raise ArtifactError(f"{root} holds no models yet; train them with `tdabench datamodels {setting.name}`")
        art = cls(root, man, spec, np.concatenate(masks), np.concatenate(margins), np.concatenate(seconds),
                  np.concatenate(seeds), q, v)
        assert_independent(art.masks, art.seeds, gt.masks, ground_truth_seeds(store, setting))
        return art


def latest(store: ResultsStore, setting: settings_mod.Setting, spec: Spec, gt: GroundTruth) -> Path | None:
    """The version holding ``spec``'s models on ``gt``'s queries with the setting's recipe, or None."""
    want = _identity(setting, spec, gt)
    for path in reversed(version_folders(family(store, setting))):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if {k: man.get(k) for k in want} == want:
            return path
    return None


def _identity(setting, spec: Spec, gt: GroundTruth) -> dict:
    return {"kind": KIND, "recipe_hash": setting.recipe_hash(), "spec": spec.identity(),
            "evaluation_queries": {"queries_sha256": sha256_file(gt.root / "queries.npy"),
                                   "validation_queries_sha256": sha256_file(gt.root / "validation_queries.npy")}}


# ---------------------------------------------------------------- building

def _train_chunk(setting, spec: Spec, c: int, data, eval_idx: torch.Tensor, root: Path, hw: str, on_model) -> None:
    from ..setup.training import evaluate, train

    n_train = len(data.train_y)
    idx = range(c * spec.chunk, (c + 1) * spec.chunk)
    margins, seconds = [], []
    for j in idx:
        seed = model_seed(spec, j)
        t0 = time.perf_counter()
        model = train(setting.model(seed), data.train_x, data.train_y, setting.recipe, seed,
                      torch.from_numpy(subset_indices(spec, n_train, j)))
        seconds.append(time.perf_counter() - t0)
        margins.append(evaluate(model, data.test_x[eval_idx], data.test_y[eval_idx])["margin"].numpy())
        on_model()
    save_npz(chunk_file(root, c), masks=np.packbits(subset_masks(spec, n_train, idx), axis=1),
             margins=np.stack(margins).astype(np.float32), seconds=np.asarray(seconds, dtype=np.float64),
             seeds=np.asarray([model_seed(spec, j) for j in idx], dtype=np.int64), hardware=np.asarray(hw))


def _chunk_done(root: Path, c: int, listed: dict) -> bool:
    path = chunk_file(root, c)
    rel = str(path.relative_to(root))
    if not path.is_file():
        return False
    if rel in listed:
        return sha256_file(path) == listed[rel]
    try:
        with np.load(path) as z:
            return z["margins"].ndim == 2
    except Exception:  # noqa: BLE001 - unreadable means not done; it is retrained and replaced
        return False


def _refresh(root: Path, man: dict, hash_cache: dict) -> dict:
    n_chunks = -(-man["models_planned"] // man["spec"]["chunk"])
    done = 0
    while done < n_chunks and _chunk_done(root, done, hash_cache):
        done += 1
    names = ["queries.npy", "validation_queries.npy"] + [str(chunk_file(root, c).relative_to(root))
                                                          for c in range(done)]
    hash_cache.update(file_hashes(root, [n for n in names if n not in hash_cache]))
    hw: dict[str, int] = {}
    for c in range(done):
        with np.load(chunk_file(root, c)) as z:
            key = hardware_key(json.loads(str(z["hardware"])))
            hw[key] = hw.get(key, 0) + len(z["seconds"])
    man.update(files={n: hash_cache[n] for n in sorted(names)}, chunks_done=done,
               models_done=done * man["spec"]["chunk"], complete=done == n_chunks, hardware=hw)
    write_json(root / MANIFEST, man)
    return man


def build(setting: settings_mod.Setting, spec: Spec, *, store: ResultsStore, gt: GroundTruth,
          max_models: int | None = None, progress: bool = True, log=print) -> Path:
    """Train the missing subset models, one at a time in this process with one torch thread (its seconds are the
    datamodel's training cost); resumable, and extending ``models`` extends the same version. Returns the folder."""
    from tqdm.auto import tqdm

    from ..setup.training import worker_training

    if spec.models % spec.chunk:
        raise ValueError(f"--models {spec.models} is not a multiple of the chunk size {spec.chunk}")
    data = setting.data()
    n_train = len(data.train_y)
    # Independence first, before an hour of training: no subset or seed of any ground truth of the setting.
    assert_independent(subset_masks(spec, n_train, range(spec.models)),
                       [model_seed(spec, j) for j in range(spec.models)], gt.masks, ground_truth_seeds(store, setting))
    fam = family(store, setting)
    store.check_writable(fam)
    root = latest(store, setting, spec, gt)
    if root is None:
        existing = version_folders(fam)
        root = fam / f"v{int(existing[-1].name[1:]) + 1 if existing else 1}"
    with ArtifactLock(root):
        for stale in remove_stale_temporaries(root):
            log(f"removed a half-written file of an interrupted build: {stale.relative_to(root)}")
        if (root / MANIFEST).is_file():
            man = read_json(root / MANIFEST)
        else:
            man = {"format_version": FORMAT_VERSION, **_identity(setting, spec, gt), "setting": setting.name,
                   "version": root.name, "models_planned": 0, "recipe": setting.recipe_record(),
                   "data": setting.data_spec.to_dict(), "measurement": "margin",
                   "evaluation": {"ground_truth": store.relative(gt.root), "root_hash": gt.root_hash()},
                   "seeds": f"model j: stable_hash([base_seed, '{NAMESPACE}', 'seed', j]); subset j: "
                            f"stable_hash([base_seed, '{NAMESPACE}', 'subset', j, N]); never a ground-truth subset or seed",
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "code_version": code_version(), "files": {}}
            save_npy(root / "queries.npy", gt.queries.astype(np.int64))
            save_npy(root / "validation_queries.npy", gt.validation_queries.astype(np.int64))
        man["models_planned"] = max(int(man["models_planned"]), spec.models)
        hash_cache = dict(man.get("files", {}))
        man = _refresh(root, man, hash_cache)
        todo = list(range(man["chunks_done"], man["models_planned"] // spec.chunk))
        if max_models is not None:
            todo = todo[:max(1, max_models // spec.chunk)]
        if todo:  # a finished artifact's manifest keeps what trained it
            man["environment"] = environment("cpu", trainer="loop", executor="in process, 1 thread")
        log(f"datamodel training {store.relative(root)}: {man['models_done']}/{man['models_planned']} models done; training "
            f"{len(todo) * spec.chunk} ({spec.chunk} a chunk, one thread)")
        eval_idx = torch.from_numpy(np.concatenate([gt.queries, gt.validation_queries]))
        hw = json.dumps(hardware("cpu"), sort_keys=True)
        bar = tqdm(total=len(todo) * spec.chunk, desc=f"datamodels {setting.name}", unit="model",
                   disable=not progress, smoothing=0.05)
        try:
            with worker_training(1):
                for c in todo:
                    _train_chunk(setting, spec, c, data, eval_idx, root, hw, lambda: bar.update(1))
                    man = _refresh(root, man, hash_cache)
        finally:
            bar.close()
            man = _refresh(root, man, hash_cache)
            # pinned once finished, and only when the pin changes (the index is shared with other builds)
            if man["complete"] and index.pinned(store, root) != index.root_hash(man):
                index.pin(store, root, index.root_hash(man), "datamodel training")
    log(f"datamodel training {store.relative(root)}: {man['models_done']}/{man['models_planned']} models"
        + (" (complete)" if man["complete"] else "; rerun to continue"))
    return root


def spec_with(spec: Spec, **overrides) -> Spec:
    return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
