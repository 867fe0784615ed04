"""Floor 3: building, resuming, extending and repairing a ground-truth artifact.

:func:`build` trains M α-subset models × R seed replicas (plus K full-data models to explain) and records their
outputs on fixed test queries. Each (subset, replica) model is one *unit*: independent of every other, written
atomically, so a build can be interrupted and resumed, split over processes, or scheduled on a cluster
(:mod:`.executors`). A build holds a lock on its artifact (a second build of the same artifact stops at once),
removes the half-written files a killed build left, and retrains exactly the units whose files fail their
checksum: the same command resumes an unfinished artifact and repairs a damaged one.
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

from ..setup import settings as settings_mod
from ..setup.artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, ArtifactLock, code_version, environment,
                               file_hashes, hardware, read_json, remove_stale_temporaries, save_npy, save_npz,
                               save_safetensors, sha256_file, write_json)
from ..setup.config import Protocol, Unit, unit_seed
from ..setup.store import ResultsStore
from . import index
from .artifact import GroundTruth, build_command, gt_root, protocol_of, versions
from .index import root_hash
from .protocol import OUTPUT_ROWS, all_units, checkpoint_file, query_indices, subset_indices, unit_file


def unit_done(root: Path, unit: Unit, n_outputs: int, listed: dict | None = None) -> bool:
    """Whether a unit's files are present and whole. A unit the manifest lists must also match its checksum:
    a damaged unit is not done, and is retrained."""
    path = unit_file(root, unit)
    files = [path] + ([checkpoint_file(root, unit.replica)] if unit.subset is None else [])
    if not all(f.is_file() for f in files):
        return False
    if listed:
        rel = [str(f.relative_to(root)) for f in files]
        if all(r in listed for r in rel):
            return all(sha256_file(f) == listed[r] for f, r in zip(files, rel))
    try:
        with np.load(path) as z:
            return z["outputs"].shape == (len(OUTPUT_ROWS), n_outputs)
    except Exception:  # noqa: BLE001 - unreadable means not done; it will be retrained and replaced
        return False


# ---------------------------------------------------------------- training one job (runs in workers)

@dataclass(frozen=True)
class Job:
    """A batch of units to train together, with everything a worker process needs (the Setting pickles by
    name and is checked to have the same recipe there)."""

    setting: settings_mod.Setting
    protocol: Protocol
    root: str
    units: tuple[Unit, ...]
    device: str = "cpu"
    trainer: str = "loop"  # "loop" or "vmap"
    threads: int = 0  # torch threads in the worker; 0 = leave as is

    def finished_part(self) -> tuple[list[dict], "Job"]:
        """The summaries of units already on disk and the job for the rest: a retried task (its worker or node
        died) must not retrain what the dead attempt finished — on a GPU a retrained model need not be bitwise
        identical to the one already hashed into the manifest."""
        n_out = self.protocol.queries + self.protocol.validation_queries
        root = Path(self.root)
        summaries, todo = [], []
        for unit in self.units:
            if not unit_done(root, unit, n_out):
                todo.append(unit)
                continue
            with np.load(unit_file(root, unit)) as z:
                s = {"unit": unit.name, "seconds": float(z["seconds"]), "query_accuracy": float(z["outputs"][2].mean())}
                if "test_accuracy" in z.files:
                    s["test_accuracy"] = float(z["test_accuracy"])
            summaries.append({**s, "already_done": True})
        return summaries, dataclasses.replace(self, units=tuple(todo))


def train_unit(setting: settings_mod.Setting, protocol: Protocol, unit: Unit, device: torch.device) -> tuple:
    """Train one unit from its seed and subset: ``(model, outputs (3, Q+V), full test accuracy or None, seconds)``.
    What :func:`run_job` writes, and what ``--reproduce`` compares a committed unit with."""
    from ..setup.training import train

    data = setting.data()
    q, v = query_indices(protocol, len(data.test_y))
    eval_idx = torch.from_numpy(np.concatenate([q, v]))
    indices = None if unit.subset is None else torch.from_numpy(subset_indices(protocol, len(data.train_y),
                                                                               unit.subset))
    seed = unit_seed(protocol, unit)
    t0 = time.perf_counter()
    model = train(setting.model(seed), data.train_x.to(device), data.train_y.to(device), setting.recipe, seed, indices)
    seconds = time.perf_counter() - t0
    return (model,) + _evaluate_unit(model, data, eval_idx, unit, device) + (seconds,)


def _evaluate_unit(model, data, eval_idx, unit: Unit, device) -> tuple:
    from ..setup.training import evaluate

    ev = evaluate(model, data.test_x[eval_idx].to(device), data.test_y[eval_idx].to(device))
    outputs = np.stack([ev[k].numpy().astype(np.float32) for k in OUTPUT_ROWS])
    acc = None
    if unit.subset is None:
        acc = float(evaluate(model, data.test_x.to(device), data.test_y.to(device))["correct"].float().mean())
    return outputs, acc


def run_job(job: Job) -> list[dict]:
    """Train the job's units, write each unit's files atomically, return small summaries."""
    from ..setup.training import worker_training

    with worker_training(job.threads):
        return _run_job(job)


def _run_job(job: Job) -> list[dict]:
    from ..setup.training import train_batched

    setting, device, root = job.setting, torch.device(job.device), Path(job.root)
    hw = json.dumps(hardware(device), sort_keys=True)

    def record(unit, model, outputs, acc, seconds):
        seed = unit_seed(job.protocol, unit)
        extra = {}
        if unit.subset is None:
            extra["test_accuracy"] = np.float64(acc)
            save_safetensors(checkpoint_file(root, unit.replica), model.state_dict(),
                             {"setting": setting.name, "unit": unit.name, "seed": str(seed)})
        save_npz(unit_file(root, unit), outputs=outputs, seconds=np.float64(seconds), seed=np.int64(seed),
                 hardware=np.asarray(hw), **extra)
        return {"unit": unit.name, "seconds": seconds, "query_accuracy": float(outputs[2].mean()),
                **{k: float(v) for k, v in extra.items()}}

    results = []
    if job.trainer == "vmap" and len(job.units) > 1 and all(u.subset is not None for u in job.units):
        data = setting.data()
        q, v = query_indices(job.protocol, len(data.test_y))
        eval_idx = torch.from_numpy(np.concatenate([q, v]))
        n = len(data.train_y)
        t0 = time.perf_counter()
        seeds = [unit_seed(job.protocol, u) for u in job.units]
        models = [setting.model(s) for s in seeds]
        states = train_batched(models, data.train_x.to(device), data.train_y.to(device), setting.recipe, seeds,
                               [torch.from_numpy(subset_indices(job.protocol, n, u.subset)) for u in job.units])
        per_model = (time.perf_counter() - t0) / len(job.units)
        for unit, model, state in zip(job.units, models, states):
            model.load_state_dict(state)
            model = model.to(device).eval()
            results.append(record(unit, model, *_evaluate_unit(model, data, eval_idx, unit, device), per_model))
    else:
        for unit in job.units:
            results.append(record(unit, *train_unit(setting, job.protocol, unit, device)))
    return results


# ---------------------------------------------------------------- versions and manifests

def plan_version(setting: settings_mod.Setting, protocol: Protocol, root: Path):
    """Pick the artifact folder for (setting, protocol) under ``root``: an existing matching version (resume,
    repair or done), else a new version, reusing units from the largest compatible older version.

    Returns ``(path, reuse_from_or_None, is_new)``.
    """
    recipe_hash = setting.recipe_hash()
    best_reuse = None
    for path in reversed(versions(root, setting.name)):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if man.get("recipe_hash") != recipe_hash:
            continue
        old = protocol_of(man)
        if old == protocol:
            return path, None, False
        if protocol.extends(old) and best_reuse is None:
            best_reuse = path
    existing = versions(root, setting.name)
    nxt = (int(existing[-1].name[1:]) + 1) if existing else 1
    return Path(root) / setting.name / f"v{nxt}", best_reuse, True


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


def write_plan(setting: settings_mod.Setting, protocol: Protocol, root: Path) -> None:
    """masks.npy, queries.npy, validation_queries.npy: what the protocol derives (rewritten byte-identically
    when damaged)."""
    data = setting.data()
    n, n_test = len(data.train_y), len(data.test_y)
    masks = np.zeros((protocol.subsets, n), dtype=bool)
    for j in range(protocol.subsets):
        masks[j, subset_indices(protocol, n, j)] = True
    save_npy(root / "masks.npy", np.packbits(masks, axis=1))
    q, v = query_indices(protocol, n_test)
    save_npy(root / "queries.npy", q.astype(np.int64))
    save_npy(root / "validation_queries.npy", v.astype(np.int64))


def init_artifact(setting: settings_mod.Setting, protocol: Protocol, root: Path, reuse_from: Path | None,
                  device: str, trainer: str) -> dict:
    (root / "units").mkdir(parents=True, exist_ok=True)
    (root / "full").mkdir(parents=True, exist_ok=True)
    write_plan(setting, protocol, root)
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
    protocol = protocol_of(man)
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


def finalize(root: Path, man: dict, setting: settings_mod.Setting, store: ResultsStore) -> dict:
    """Mark a build complete once every unit is present: noise ceiling, summary and the hardware that trained
    it go in the manifest, and its root hash is pinned in the store's index."""
    man = refresh_manifest(root, man)
    if man["units_done"] != man["units_total"]:
        raise ArtifactError(f"{root}: {man['units_done']}/{man['units_total']} units done; cannot finalize")
    gt = GroundTruth._load(root, man, setting, pinned=False)
    man["noise_ceiling"] = gt.ceilings()
    man["summary"] = gt.summary()
    man["hardware"] = {key: len(units) for key, units in gt.hardware_groups().items()}
    man["complete"] = True
    man["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(root / MANIFEST, json.loads(json.dumps(man)))
    index.pin(store, root, root_hash(man), "ground truth")
    return man


# ---------------------------------------------------------------- building

def make_jobs(setting: settings_mod.Setting, protocol: Protocol, root: Path, pending: list[Unit], device: str,
              trainer: str, threads: int, models_per_job: int) -> list[Job]:
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


def _pick_trainer(setting, protocol, device, trainer, recorded, root, log) -> str:
    if trainer == "auto" and recorded:
        return recorded  # loop and vmap agree only to float round-off: one artifact keeps the trainer it started with
    if trainer == "auto" and setting.trainer:
        log(f"trainer: {setting.trainer} (the setting's choice)")
        return setting.trainer
    if trainer == "auto":
        from ..setup.training import choose_trainer

        trainer, timing = choose_trainer(setting, torch.device(device), protocol.subsets * protocol.seeds)
        if timing:
            log(f"trainer: {trainer} (calibration, s per model for a few steps: "
                + ", ".join(f"{k} {v:.3f}" for k, v in timing.items()) + ")")
        return trainer
    if recorded and trainer != recorded:
        log(f"warning: {root} was started with the {recorded} trainer; continuing with {trainer} as asked "
            f"(the two agree only to float round-off)")
    return trainer


def build(setting: settings_mod.Setting, protocol: Protocol | None = None, *, store: ResultsStore,
          study: bool = False, executor=None, device: str | None = None, trainer: str = "auto",
          models_per_job: int = 100, max_units: int | None = None, progress: bool = True, log=print) -> Path:
    """Build, resume, extend or repair a ground truth. Returns the artifact folder.

    ``max_units`` stops after that many units (to commit a long build in pieces); the artifact then stays
    ``complete: false`` until a later call finishes it. A complete artifact is re-verified: units whose files
    fail their checksum are retrained, the plan files rewritten, and the artifact finalized again.
    """
    from tqdm.auto import tqdm

    from ..setup.training import default_device
    from .executors import LocalExecutor

    protocol = protocol or setting.protocols["default"]
    device = device or str(default_device())
    root_dir = gt_root(store, study)
    store.check_writable(root_dir)
    root, reuse, is_new = plan_version(setting, protocol, root_dir)
    if is_new:
        tmp = root.with_name(f".{root.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        chosen = _pick_trainer(setting, protocol, device, trainer, None, root, log)
        man = init_artifact(setting, protocol, tmp, reuse, device, chosen)
        man["version"] = root.name
        write_json(tmp / MANIFEST, man)
        os.replace(tmp, root)  # the version appears whole, with its plan, or not at all
        log(f"new ground truth {root}" + (f" (reusing units from {reuse.name})" if reuse else ""))
    with ArtifactLock(root):
        for stale in remove_stale_temporaries(root):
            log(f"removed a half-written file of an interrupted build: {stale.relative_to(root)}")
        man = read_json(root / MANIFEST)
        listed = dict(man.get("files", {}))
        n_out = protocol.queries + protocol.validation_queries
        damaged_plan = [n for n in ("masks.npy", "queries.npy", "validation_queries.npy")
                        if n in listed and (not (root / n).is_file() or sha256_file(root / n) != listed[n])]
        if damaged_plan:
            write_plan(setting, protocol, root)
            log(f"rewrote {', '.join(damaged_plan)} from the protocol")
        pending = [u for u in all_units(protocol) if not unit_done(root, u, n_out, listed)]
        damaged = [u for u in pending if str(unit_file(root, u).relative_to(root)) in listed]
        if man.get("complete") and not pending:
            if damaged_plan:
                man = finalize(root, man, setting, store)
                log(f"{root}: repaired and verified")
            else:
                log(f"{root} is complete ({man['units_total']} units) and verified; nothing to do")
            return root
        if damaged:
            log(f"{root}: {len(damaged)} unit(s) fail their checksum and will be retrained: "
                + ", ".join(u.name for u in damaged[:8]) + (" ..." if len(damaged) > 8 else ""))
            for u in damaged:  # no longer part of the artifact until retrained
                for f in (unit_file(root, u), checkpoint_file(root, u.replica)):
                    if u.subset is not None and f.suffix == ".safetensors":
                        continue
                    f.unlink(missing_ok=True)
                    man["files"].pop(str(f.relative_to(root)), None)
            man["complete"] = False
            write_json(root / MANIFEST, man)
        recorded = man.get("environment", {}).get("trainer")
        trainer = _pick_trainer(setting, protocol, device, trainer, recorded, root, log)
        executor = executor or LocalExecutor.auto(torch.device(device), trainer)
        already = man["units_total"] - len(pending)
        if max_units is not None:
            pending = pending[:max_units]
        log(f"{setting.name}: {already}/{man['units_total']} units done; training {len(pending)} on {device} "
            f"({trainer}, {executor.describe()})")
        jobs = make_jobs(setting, protocol, root, pending, device, trainer, executor.threads_per_worker,
                         models_per_job)
        hash_cache = {k: v for k, v in man.get("files", {}).items()}
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
            man = finalize(root, man, setting, store)
            nc = man["noise_ceiling"]["margin"]
            log(f"complete: {root}; noise ceiling (margin): single-seed agreement {nc.get('pairwise_single_seed')}, "
                f"LDS ceiling {nc.get('lds_ceiling')}")
            if len(man["hardware"]) > 1:
                log(f"note: {root} was trained on {len(man['hardware'])} kinds of hardware: " + "; ".join(
                    f"{n} units on {k}" for k, n in man["hardware"].items()))
        else:
            log(f"{root}: {man['units_done']}/{man['units_total']} units done (complete: false); resume with "
                f"`{build_command(man, root, setting, store)}`")
    return root


def protocol_with(base: Protocol, **overrides) -> Protocol:
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
