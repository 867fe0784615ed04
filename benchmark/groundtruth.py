"""Floor 5: the ground-truth harness for the Linear Datamodeling Score.

``build`` trains M α-subset models × R seed replicas (plus K full-data models to explain) and records
their outputs on fixed test queries. Each (subset, replica) model is one *unit*: independent of every
other, written atomically, so a build can be interrupted and resumed, split over processes, or
scheduled on a cluster (see ``executors.py``). ``load`` returns a verified :class:`GroundTruth`.

Artifact layout (``results/gt/<setting>/<version>/``)::

    manifest.json               protocol, recipe + hash, data sha256, environment, files {path: sha256},
                                noise ceiling, complete flag
    masks.npy                   (M, ceil(N/8)) uint8: subset membership, bit-packed along N
    queries.npy                 (Q,) int64 test indices reported on
    validation_queries.npy      (V,) int64 disjoint test indices for hyper-parameter selection
    units/r{r}_s{j}.npz         outputs (3, Q+V) float32: margin, loss, correct; seconds; seed
    full/full_k{k}.npz          the same for full-data model k, plus its full test-set accuracy
    full/full_k{k}.safetensors  full-data model k's weights (the model solvers explain)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import settings as settings_mod
from .artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, code_version, environment, file_hashes,
                        load_safetensors, read_json, save_npy, save_npz, save_safetensors, verify_files,
                        write_json)
from .config import Protocol, Unit, stable_hash, unit_seed
from .plugins import REPO_ROOT
from .stats import noise_ceiling

GT_ROOT = REPO_ROOT / "results" / "gt"
# Ground truths built to study a protocol factor (another seed policy, a derived recipe): kept apart so that
# the benchmark, which uses the newest complete version under GT_ROOT, never picks one up.
STUDY_ROOT = REPO_ROOT / "results" / "gt-studies"
OUTPUT_ROWS = ("margin", "loss", "correct")


# ---------------------------------------------------------------- protocol -> concrete indices

def subset_size(protocol: Protocol, n_train: int) -> int:
    return int(round(protocol.alpha * n_train))


def subset_indices(protocol: Protocol, n_train: int, j: int) -> np.ndarray:
    """Training indices of subset j. Depends only on (base_seed, j, n, α): extending M keeps old subsets."""
    rng = np.random.default_rng(int(stable_hash([protocol.base_seed, "subset", j, n_train], 8), 16))
    return np.sort(rng.choice(n_train, subset_size(protocol, n_train), replace=False))


def query_indices(protocol: Protocol, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Reported queries and disjoint validation queries, a seeded draw from the test set."""
    if protocol.queries + protocol.validation_queries > n_test:
        raise ValueError(f"{protocol.queries} queries + {protocol.validation_queries} validation queries "
                         f"exceed the {n_test} test points")
    rng = np.random.default_rng(int(stable_hash([protocol.base_seed, "queries", n_test], 8), 16))
    perm = rng.permutation(n_test)
    q = perm[:protocol.queries]
    return np.sort(q), np.sort(perm[protocol.queries:protocol.queries + protocol.validation_queries])


def all_units(protocol: Protocol) -> list[Unit]:
    """Full-data models first (solvers need them), then replica by replica: a partial build holds
    complete single-seed ground truths as early as possible."""
    full = [Unit(k, None) for k in range(protocol.full_models)]
    return full + [Unit(r, j) for r in range(protocol.seeds) for j in range(protocol.subsets)]


def unit_file(root: Path, unit: Unit) -> Path:
    return root / ("full" if unit.subset is None else "units") / f"{unit.name}.npz"


def checkpoint_file(root: Path, k: int) -> Path:
    return root / "full" / f"full_k{k:02d}.safetensors"


def unit_done(root: Path, unit: Unit, n_outputs: int) -> bool:
    path = unit_file(root, unit)
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            ok = z["outputs"].shape == (len(OUTPUT_ROWS), n_outputs)
    except Exception:  # noqa: BLE001 - unreadable means not done; it will be retrained and replaced
        return False
    if unit.subset is None:
        ok = ok and checkpoint_file(root, unit.replica).is_file()
    return ok


# ---------------------------------------------------------------- training one job (runs in workers)

@dataclass(frozen=True)
class Job:
    """A batch of units to train together, with everything a worker process needs."""

    setting: str
    protocol: Protocol
    root: str
    units: tuple[Unit, ...]
    device: str = "cpu"
    trainer: str = "loop"  # "loop" or "vmap"
    threads: int = 0  # torch threads in the worker; 0 = leave as is


def run_job(job: Job) -> list[dict]:
    """Train the job's units, write each unit's files atomically, return small summaries."""
    from .training import evaluate, train, train_batched

    if job.threads:
        torch.set_num_threads(job.threads)
    setting = settings_mod.get(job.setting)
    data = setting.data()
    device = torch.device(job.device)
    root = Path(job.root)
    q, v = query_indices(job.protocol, len(data.test_y))
    eval_idx = torch.from_numpy(np.concatenate([q, v]))
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    eval_x, eval_y = data.test_x[eval_idx].to(device), data.test_y[eval_idx].to(device)
    n = len(data.train_y)

    def indices(unit):
        return None if unit.subset is None else torch.from_numpy(subset_indices(job.protocol, n, unit.subset))

    def record(unit, model, seconds):
        ev = evaluate(model, eval_x, eval_y)
        outputs = np.stack([ev[k].numpy().astype(np.float32) for k in OUTPUT_ROWS])
        seed = unit_seed(job.protocol, unit)
        extra = {}
        if unit.subset is None:
            full_ev = evaluate(model, data.test_x.to(device), data.test_y.to(device))
            extra["test_accuracy"] = np.float64(full_ev["correct"].float().mean())
            save_safetensors(checkpoint_file(root, unit.replica), model.state_dict(),
                             {"setting": job.setting, "unit": unit.name, "seed": str(seed)})
        save_npz(unit_file(root, unit), outputs=outputs, seconds=np.float64(seconds), seed=np.int64(seed), **extra)
        return {"unit": unit.name, "seconds": seconds, "query_accuracy": float(outputs[2].mean()),
                **{k: float(v) for k, v in extra.items()}}

    results = []
    if job.trainer == "vmap" and len(job.units) > 1 and all(u.subset is not None for u in job.units):
        t0 = time.perf_counter()
        seeds = [unit_seed(job.protocol, u) for u in job.units]
        models = [setting.model(s) for s in seeds]
        states = train_batched(models, train_x, train_y, setting.recipe, seeds, [indices(u) for u in job.units])
        per_model = (time.perf_counter() - t0) / len(job.units)
        for unit, model, state in zip(job.units, models, states):
            model.load_state_dict(state)
            results.append(record(unit, model.to(device).eval(), per_model))
    else:
        for unit in job.units:
            t0 = time.perf_counter()
            seed = unit_seed(job.protocol, unit)
            model = train(setting.model(seed), train_x, train_y, setting.recipe, seed, indices(unit))
            results.append(record(unit, model, time.perf_counter() - t0))
    return results


# ---------------------------------------------------------------- versions and manifests

def versions(setting: str, gt_root: Path = GT_ROOT) -> list[Path]:
    d = Path(gt_root) / setting
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def _protocol_of(manifest: dict) -> Protocol:
    return Protocol(**manifest["protocol"])


def build_command(manifest: dict, root: Path | None = None) -> str:
    """The ``tdabench gt`` command that resumes the artifact ``manifest`` describes. A build resumes only the
    version with the same protocol, so the command names every protocol value that differs from the setting's
    default, and ``--study`` for an artifact under :data:`STUDY_ROOT` (plain ``tdabench gt SETTING`` would
    start or resume the default protocol's artifact instead)."""
    name = manifest["setting"]
    try:
        base = settings_mod.get(name).protocols["default"]
    except (KeyError, ValueError):  # a setting this code no longer knows: name every value
        base = None
    words = ["tdabench", "gt", name]
    if root is not None and settings_mod.DERIVED_SEP not in name and Path(root).resolve().is_relative_to(
            Path(STUDY_ROOT).resolve()):
        words.append("--study")
    for f in dataclasses.fields(Protocol):
        value = manifest.get("protocol", {}).get(f.name)
        if value is not None and (base is None or value != getattr(base, f.name)):
            words += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def plan_version(setting: settings_mod.Setting, protocol: Protocol, gt_root: Path = GT_ROOT):
    """Pick the artifact folder for (setting, protocol): an existing matching version (resume or done),
    else a new version, reusing units from the largest compatible older version.

    Returns ``(path, reuse_from_or_None, is_new)``.
    """
    recipe_hash = setting.recipe_hash()
    best_reuse = None
    for path in reversed(versions(setting.name, gt_root)):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if man.get("recipe_hash") != recipe_hash:
            continue
        old = _protocol_of(man)
        if old == protocol:
            return path, None, False
        if protocol.extends(old) and best_reuse is None:
            best_reuse = path
    existing = versions(setting.name, gt_root)
    nxt = (int(existing[-1].name[1:]) + 1) if existing else 1
    return Path(gt_root) / setting.name / f"v{nxt}", best_reuse, True


def _base_manifest(setting: settings_mod.Setting, protocol: Protocol, root: Path, device: str, trainer: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "setting": setting.name,
        "version": root.name,
        "complete": False,
        "protocol": protocol.to_dict(),
        "units_total": len(all_units(protocol)),
        "units_done": 0,
        "recipe": setting.recipe_record(),
        "recipe_hash": setting.recipe_hash(),
        "data": setting.data_spec.to_dict(),
        "measurement": setting.measurement,
        "outputs": {"rows": list(OUTPUT_ROWS), "columns": "queries then validation_queries"},
        "environment": environment(device, trainer=trainer),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "files": {},
        "noise_ceiling": None,
        "summary": {},
    }


def init_artifact(setting: settings_mod.Setting, protocol: Protocol, root: Path, reuse_from: Path | None,
                  device: str, trainer: str) -> dict:
    data = setting.data()
    n, n_test = len(data.train_y), len(data.test_y)
    (root / "units").mkdir(parents=True, exist_ok=True)
    (root / "full").mkdir(parents=True, exist_ok=True)
    masks = np.zeros((protocol.subsets, n), dtype=bool)
    for j in range(protocol.subsets):
        masks[j, subset_indices(protocol, n, j)] = True
    save_npy(root / "masks.npy", np.packbits(masks, axis=1))
    q, v = query_indices(protocol, n_test)
    save_npy(root / "queries.npy", q.astype(np.int64))
    save_npy(root / "validation_queries.npy", v.astype(np.int64))
    if reuse_from is not None:
        wanted = {unit_file(root, u).relative_to(root) for u in all_units(protocol)}
        wanted |= {checkpoint_file(root, k).relative_to(root) for k in range(protocol.full_models)}
        old_files = read_json(reuse_from / MANIFEST).get("files", {})
        for rel in sorted(wanted):
            if str(rel) in old_files and (reuse_from / rel).is_file():
                shutil.copy2(reuse_from / rel, root / rel)
    man = _base_manifest(setting, protocol, root, device, trainer)
    man["reused_from"] = reuse_from.name if reuse_from is not None else None
    refresh_manifest(root, man)
    return man


def refresh_manifest(root: Path, man: dict, hash_cache: dict | None = None) -> dict:
    """Re-list the artifact's files with their sha256 (cached per file name) and save the manifest."""
    protocol = _protocol_of(man)
    n_out = protocol.queries + protocol.validation_queries
    names = ["masks.npy", "queries.npy", "validation_queries.npy"]
    done = [u for u in all_units(protocol) if unit_done(root, u, n_out)]
    for u in done:
        names.append(str(unit_file(root, u).relative_to(root)))
        if u.subset is None:
            names.append(str(checkpoint_file(root, u.replica).relative_to(root)))
    cache = hash_cache if hash_cache is not None else {}
    missing = [n for n in names if n not in cache]
    cache.update(file_hashes(root, missing))
    man["files"] = {n: cache[n] for n in sorted(names)}
    man["units_done"] = len(done)
    write_json(root / MANIFEST, man)
    return man


def finalize(root: Path, man: dict) -> dict:
    """Mark a build complete once every unit is present: noise ceiling and summary go in the manifest."""
    man = refresh_manifest(root, man)
    if man["units_done"] != man["units_total"]:
        raise ArtifactError(f"{root}: {man['units_done']}/{man['units_total']} units done; cannot finalize")
    gt = GroundTruth.open(root, allow_incomplete=True)
    q = len(gt.queries)
    man["noise_ceiling"] = {m: noise_ceiling(gt.outputs[m][:, :, :q]) for m in ("margin", "loss")}
    man["summary"] = gt.summary()
    man["complete"] = True
    man["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(root / MANIFEST, man)
    return man


# ---------------------------------------------------------------- loading and verifying

@dataclass
class GroundTruth:
    """A verified ground-truth artifact in memory.

    ``outputs[m]`` is (R, M, Q+V) float32 for m in margin/loss/correct; NaN marks units not yet built
    (only possible with ``allow_incomplete``). Columns: the Q reported queries, then the V validation ones.
    """

    root: Path
    manifest: dict
    protocol: Protocol
    masks: np.ndarray  # (M, N) bool
    queries: np.ndarray
    validation_queries: np.ndarray
    outputs: dict
    full_outputs: dict  # m -> (K, Q+V)
    full_test_accuracy: np.ndarray
    unit_seconds: np.ndarray  # (R, M)

    @classmethod
    def open(cls, root: Path, setting: settings_mod.Setting | None = None, allow_incomplete: bool = False,
             verify: bool = True) -> "GroundTruth":
        root = Path(root)
        man = read_json(root / MANIFEST)
        hint = (f"rebuild it with `{build_command(man, root)}` (it resumes from the valid units)" if "setting" in man
                else "rebuild it with `tdabench gt <setting>`")
        if man.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{root}: artifact format {man.get('format_version')} is not {FORMAT_VERSION}; {hint}")
        if setting is not None:
            current = setting.recipe_hash()
            if man["recipe_hash"] != current:
                old, new = man["recipe"], setting.recipe_record()
                diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                raise ArtifactError(
                    f"{root} is stale: built with recipe {man['recipe_hash']}, the code now has {current} "
                    f"(differs in: {', '.join(diff)}). Build a new version with `tdabench gt {setting.name}`.")
        if not man.get("complete") and not allow_incomplete:
            raise ArtifactError(
                f"{root} is incomplete ({man.get('units_done')}/{man.get('units_total')} units): finish it with "
                f"`{build_command(man, root)}` before using it as ground truth")
        if verify:
            verify_files(root, man["files"], hint)
        protocol = _protocol_of(man)
        n_train = man["data"]["train_size"]
        masks = np.unpackbits(np.load(root / "masks.npy"), axis=1, count=n_train).astype(bool)
        q = np.load(root / "queries.npy")
        v = np.load(root / "validation_queries.npy")
        n_out = len(q) + len(v)
        outs = {k: np.full((protocol.seeds, protocol.subsets, n_out), np.nan, np.float32) for k in OUTPUT_ROWS}
        secs = np.full((protocol.seeds, protocol.subsets), np.nan)
        full = {k: np.full((protocol.full_models, n_out), np.nan, np.float32) for k in OUTPUT_ROWS}
        acc = np.full(protocol.full_models, np.nan)
        listed = set(man["files"])
        for u in all_units(protocol):
            path = unit_file(root, u)
            if str(path.relative_to(root)) not in listed:
                continue
            with np.load(path) as z:
                if u.subset is None:
                    for i, k in enumerate(OUTPUT_ROWS):
                        full[k][u.replica] = z["outputs"][i]
                    acc[u.replica] = float(z["test_accuracy"])
                else:
                    for i, k in enumerate(OUTPUT_ROWS):
                        outs[k][u.replica, u.subset] = z["outputs"][i]
                    secs[u.replica, u.subset] = float(z["seconds"])
        return cls(root, man, protocol, masks, q, v, outs, full, acc, secs)

    def target(self, measurement: str = "margin", split: str = "queries", replicas=None) -> np.ndarray:
        """(M, Q) ground-truth outputs averaged over the chosen seed replicas (all complete ones by default)."""
        arr = self.outputs[measurement]
        q = len(self.queries)
        arr = arr[:, :, :q] if split == "queries" else arr[:, :, q:]
        if replicas is None:
            replicas = [r for r in range(arr.shape[0]) if np.isfinite(arr[r]).all()]
        if not replicas:
            raise ArtifactError(f"{self.root}: no complete seed replica yet")
        return arr[list(replicas)].mean(axis=0)

    def complete_replicas(self) -> list[int]:
        return [r for r in range(self.protocol.seeds) if np.isfinite(self.outputs["margin"][r]).all()]

    def full_model(self, setting: settings_mod.Setting, k: int = 0) -> torch.nn.Module:
        path = checkpoint_file(self.root, k)
        if not path.is_file():
            raise ArtifactError(f"{self.root}: full-data model {k} has not been built yet")
        model = setting.model(0)
        model.load_state_dict(load_safetensors(path))
        return model.eval()

    def summary(self) -> dict:
        q = len(self.queries)
        done = np.isfinite(self.outputs["margin"][:, :, 0])
        return {
            "subset_units_done": int(done.sum()),
            "complete_replicas": self.complete_replicas(),
            "full_model_test_accuracy": [None if np.isnan(a) else round(float(a), 5) for a in self.full_test_accuracy],
            "subset_model_query_accuracy": None if not done.any() else
            round(float(np.nanmean(self.outputs["correct"][:, :, :q][done])), 5),
            "mean_seconds_per_subset_model": None if not done.any() else round(float(np.nanmean(self.unit_seconds)), 3),
        }


def latest(setting: str, gt_root: Path = GT_ROOT, allow_incomplete: bool = False) -> Path:
    """The newest version of a setting's ground truth (complete ones only unless ``allow_incomplete``)."""
    found, unfinished = [], []
    for path in versions(setting, gt_root):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if man.get("complete") or allow_incomplete:
            found.append(path)
        else:
            unfinished.append((f"{path.name} ({man.get('units_done')}/{man.get('units_total')} units)",
                               build_command(man, path)))
    if not found and unfinished:
        raise ArtifactError(f"the ground truth for {setting!r} is incomplete: {', '.join(u for u, _ in unfinished)}; "
                            f"finish it with `{unfinished[-1][1]}` (it resumes)")
    if not found:
        raise ArtifactError(f"no {'' if allow_incomplete else 'complete '}ground truth for {setting!r} under "
                            f"{Path(gt_root) / setting}; build it with `tdabench gt {setting}`")
    return found[-1]


def load(setting: str, version: str | None = None, gt_root: Path = GT_ROOT, allow_incomplete: bool = False) -> GroundTruth:
    s = settings_mod.get(setting)
    root = Path(gt_root) / setting / version if version else latest(setting, gt_root, allow_incomplete)
    return GroundTruth.open(root, s, allow_incomplete=allow_incomplete)


# ---------------------------------------------------------------- building

def make_jobs(setting: str, protocol: Protocol, root: Path, pending: list[Unit], device: str, trainer: str,
              threads: int, models_per_job: int) -> list[Job]:
    jobs, batch = [], []
    for u in pending:
        if u.subset is None or trainer == "loop":
            jobs.append(Job(setting, protocol, str(root), (u,), device, trainer, threads))
            continue
        batch.append(u)
        if len(batch) == models_per_job:
            jobs.append(Job(setting, protocol, str(root), tuple(batch), device, trainer, threads))
            batch = []
    if batch:
        jobs.append(Job(setting, protocol, str(root), tuple(batch), device, trainer, threads))
    return jobs


def build(setting_name: str, protocol: Protocol | None = None, *, gt_root: Path = GT_ROOT, executor=None,
          device: str | None = None, trainer: str = "auto", models_per_job: int = 100,
          max_units: int | None = None, progress: bool = True, log=print) -> Path:
    """Build (or resume, or extend) a ground truth. Returns the artifact folder.

    ``max_units`` stops after that many units (to commit a long build in pieces); the artifact then
    stays ``complete: false`` until a later call finishes it.
    """
    from tqdm.auto import tqdm

    from .executors import LocalExecutor
    from .training import choose_trainer, default_device

    setting = settings_mod.get(setting_name)
    protocol = protocol or setting.protocols["default"]
    device = device or str(default_device())
    root, reuse, is_new = plan_version(setting, protocol, gt_root)
    recorded = None if is_new else read_json(root / MANIFEST).get("environment", {}).get("trainer")
    if trainer == "auto" and recorded:
        # loop and vmap agree only to float round-off: one artifact keeps the trainer it started with
        trainer = recorded
    elif trainer == "auto" and setting.trainer:
        trainer = setting.trainer
        log(f"trainer: {trainer} (the setting's choice)")
    elif trainer == "auto":
        trainer, timing = choose_trainer(setting, torch.device(device), protocol.subsets * protocol.seeds)
        if timing:
            log(f"trainer: {trainer} (calibration, s per model for a few steps: "
                + ", ".join(f"{k} {v:.3f}" for k, v in timing.items()) + ")")
    elif recorded and trainer != recorded:
        log(f"warning: {root} was started with the {recorded} trainer; continuing with {trainer} as asked "
            f"(the two agree only to float round-off)")
    executor = executor or LocalExecutor.auto(torch.device(device), trainer)
    if is_new:
        tmp = root.with_name(f".{root.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        man = init_artifact(setting, protocol, tmp, reuse, device, trainer)
        man["version"] = root.name
        write_json(tmp / MANIFEST, man)
        os.replace(tmp, root)  # the version appears whole, with its plan, or not at all
        log(f"new ground truth {root}" + (f" (reusing units from {reuse.name})" if reuse else ""))
    man = read_json(root / MANIFEST)
    if man.get("complete"):
        log(f"{root} is complete ({man['units_total']} units); nothing to do")
        return root
    n_out = protocol.queries + protocol.validation_queries
    pending = [u for u in all_units(protocol) if not unit_done(root, u, n_out)]
    already = man["units_total"] - len(pending)
    if max_units is not None:
        pending = pending[:max_units]
    log(f"{setting.name}: {already}/{man['units_total']} units done; training {len(pending)} on {device} "
        f"({trainer}, {executor.describe()})")
    jobs = make_jobs(setting.name, protocol, root, pending, device, trainer, executor.threads_per_worker,
                     models_per_job)
    hash_cache = dict(man.get("files", {}))
    man["environment"] = environment(device, trainer=trainer, executor=executor.describe())
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc=f"gt {setting.name}", unit="model", disable=not progress, smoothing=0.05)
    seconds = []
    try:
        for results in executor.run(run_job, jobs):
            seconds += [r["seconds"] for r in results]
            bar.update(len(results))
            bar.set_postfix(last=results[-1]["unit"], acc=f"{results[-1]['query_accuracy']:.3f}")
            refresh_manifest(root, man, hash_cache)
    finally:
        bar.close()
        refresh_manifest(root, man, hash_cache)
    wall = time.perf_counter() - t0
    if seconds:
        log(f"trained {len(seconds)} models in {wall / 60:.1f} min wall ({60 * len(seconds) / max(wall, 1e-9):.1f} "
            f"models/min; {np.mean(seconds):.1f} s a model inside its worker)")
    if man["units_done"] == man["units_total"]:
        man = finalize(root, man)
        nc = man["noise_ceiling"]["margin"]
        log(f"complete: {root}; noise ceiling (margin): single-seed agreement {nc.get('pairwise_single_seed')}, "
            f"LDS ceiling {nc.get('lds_ceiling')}")
    else:
        log(f"{root}: {man['units_done']}/{man['units_total']} units done (complete: false); rerun to continue")
    return root


def verify(setting_name: str, version: str | None = None, gt_root: Path = GT_ROOT) -> dict:
    """Verify an artifact fully (checksums, recipe) and return a printable summary."""
    gt = load(setting_name, version, gt_root, allow_incomplete=True)
    man = gt.manifest
    return {
        "artifact": str(gt.root),
        "complete": man["complete"],
        "units": f"{man['units_done']}/{man['units_total']}",
        "protocol": man["protocol"],
        "recipe_hash": man["recipe_hash"],
        "files_verified": len(man["files"]),
        "noise_ceiling": man.get("noise_ceiling"),
        "summary": gt.summary(),
    }


def protocol_with(base: Protocol, **overrides) -> Protocol:
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
