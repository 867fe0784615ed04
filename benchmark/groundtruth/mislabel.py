"""Floor 3: the corrupted setting for mislabel detection (the paper's §7.2), as a versioned artifact.

A fraction of the training labels (10% by default) is flipped to a *different* class with a seed
(``data.corrupt_labels``), and K full-data models are trained on the corrupted labels with the setting's
recipe. Solvers then rank the training points by self-influence on those models.

Artifact layout (``<store>/mislabel/<setting>/<version>/``), verified like the ground truth::

    manifest.json              setting, corruption {fraction, seed}, effective recipe + hash, data sha256,
                               per-model accuracies, environment, files {path: sha256}
    flipped.npy                (F,) int64 sorted indices of the flipped training points
    labels.npy                 (N,) uint8 the corrupted training labels
    full_k{k}.safetensors      full-data model k trained on the corrupted labels

A version is identified by (effective recipe hash, fraction, corruption seed, K): asking again for the
same spec finds it; another spec makes a new version. Loading re-derives the flips with the current code
and rejects the artifact if they differ, so a change to ``corrupt_labels`` cannot silently mix setups.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..setup import settings as settings_mod
from ..setup.artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, ArtifactLock, code_version, environment,
                               file_hashes, load_safetensors, read_json, remove_stale_temporaries, save_npy,
                               save_safetensors, verify_files, version_folders, write_json)
from ..setup.config import TRAINING_CODE_VERSION, stable_hash
from ..setup.data import corrupt_labels
from ..setup.store import ResultsStore
from . import index
DEFAULT_FRACTION = 0.1
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Spec:
    fraction: float = DEFAULT_FRACTION
    seed: int = DEFAULT_SEED
    full_models: int = 1
    epochs: int | None = None  # override the setting's epochs (e.g. to study earlier/shorter training)

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"corruption fraction must be in (0, 1), got {self.fraction}")
        if self.full_models < 1:
            raise ValueError("full_models must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be >= 1")


def recipe_of(setting: settings_mod.Setting, spec: Spec):
    return setting.recipe if spec.epochs is None else dataclasses.replace(setting.recipe, epochs=spec.epochs)


def recipe_record(setting: settings_mod.Setting, spec: Spec) -> dict:
    rec = setting.recipe_record()
    rec["train"] = recipe_of(setting, spec).to_dict()
    rec["training_code_version"] = TRAINING_CODE_VERSION
    return rec


def spec_key(setting: settings_mod.Setting, spec: Spec) -> str:
    return stable_hash({"recipe": stable_hash(recipe_record(setting, spec)), "fraction": spec.fraction,
                        "seed": spec.seed, "full_models": spec.full_models})


def model_seed(setting_name: str, spec: Spec, k: int) -> int:
    return int(stable_hash(["mislabel", setting_name, spec.seed, k], 8), 16)


def checkpoint_name(k: int) -> str:
    return f"full_k{k:02d}.safetensors"


def versions(store: ResultsStore, setting: settings_mod.Setting) -> list[Path]:
    return version_folders(store.mislabel / setting.name)


def find(store: ResultsStore, setting: settings_mod.Setting, spec: Spec | None = None) -> Path | None:
    """The newest complete version for ``spec`` (any spec when None), or None."""
    want = spec_key(setting, spec) if spec is not None else None
    for path in reversed(versions(store, setting)):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if man.get("complete") and (want is None or man.get("spec_key") == want):
            return path
    return None


@dataclass
class MislabelArtifact:
    root: Path
    manifest: dict
    setting: settings_mod.Setting
    flipped: np.ndarray  # (F,) int64
    labels: torch.Tensor  # (N,) int64 corrupted labels

    def model(self, k: int = 0) -> torch.nn.Module:
        if k >= self.manifest["spec"]["full_models"]:
            raise ArtifactError(f"{self.root} holds {self.manifest['spec']['full_models']} model(s); "
                                f"model {k} was asked for")
        m = self.setting.model(0)
        m.load_state_dict(load_safetensors(self.root / checkpoint_name(k)))
        return m.eval()

    def root_hash(self) -> str:
        return index.root_hash(self.manifest)


def open_artifact(store: ResultsStore, root: Path, setting: settings_mod.Setting, verify: bool = True) -> MislabelArtifact:
    """Load and verify an artifact: checksums, recipe, pinned root hash, and that the code still makes the
    same flips."""
    root = Path(root)
    man = read_json(root / MANIFEST)
    hint = f"delete {root} and rebuild it with `tdabench mislabel {man.get('setting', '<setting>')} --build`"
    if man.get("format_version") != FORMAT_VERSION or man.get("kind") != "mislabel":
        raise ArtifactError(f"{root} is not a mislabel artifact of format {FORMAT_VERSION}; {hint}")
    if man.get("setting") != setting.name:
        raise ArtifactError(f"{root} holds the corrupted models of {man.get('setting')!r}, not of {setting.name!r}")
    if not man.get("complete"):
        raise ArtifactError(f"{root} is incomplete; finish it with `tdabench mislabel {man['setting']} --build`")
    spec = Spec(**man["spec"])
    current = stable_hash(recipe_record(setting, spec))
    if man["recipe_hash"] != current:
        raise ArtifactError(f"{root} is stale: built with recipe {man['recipe_hash']}, the code now has {current}. "
                            f"Build a new version with `tdabench mislabel {setting.name} --build`.")
    index.check(store, root, index.root_hash(man))
    if verify:
        verify_files(root, man["files"], hint)
    flipped = np.load(root / "flipped.npy")
    labels = torch.from_numpy(np.load(root / "labels.npy").astype(np.int64))
    if verify:
        data = setting.data()
        new_labels, new_flipped = corrupt_labels(data.train_y, spec.fraction, data.num_classes, spec.seed)
        if not (np.array_equal(new_flipped.numpy(), flipped) and torch.equal(new_labels, labels)):
            raise ArtifactError(f"{root}: the label corruption code now flips different points than this artifact "
                                f"holds (seed {spec.seed}); {hint}")
    return MislabelArtifact(root, man, setting, flipped, labels)


def load(store: ResultsStore, setting: settings_mod.Setting, spec: Spec | None = None) -> MislabelArtifact:
    path = find(store, setting, spec)
    if path is None:
        what = f"spec {spec}" if spec is not None else "any spec"
        raise ArtifactError(f"no mislabel artifact for {setting.name!r} ({what}) under {store.mislabel / setting.name}; "
                            f"build it with `tdabench mislabel {setting.name} --build` (trains the corrupted model)")
    return open_artifact(store, path, setting)


def build(setting: settings_mod.Setting, spec: Spec = Spec(), *, store: ResultsStore, device: str | None = None,
          log=print) -> Path:
    """Build (or find) the artifact for ``spec``; resumable model by model. Returns its folder."""
    from ..setup.training import default_device

    existing = find(store, setting, spec)
    if existing is not None:
        log(f"{existing} already holds this corruption spec; nothing to do")
        return existing
    store.check_writable(store.mislabel)
    key = spec_key(setting, spec)
    all_versions = versions(store, setting)
    # Resume an unfinished build of the same spec, else start the next version.
    target = None
    for path in all_versions:
        if (path / MANIFEST).is_file() and read_json(path / MANIFEST).get("spec_key") == key:
            target = path
    if target is None:
        nxt = (int(all_versions[-1].name[1:]) + 1) if all_versions else 1
        target = store.mislabel / setting.name / f"v{nxt}"
    device = device or str(default_device())
    with ArtifactLock(target):
        remove_stale_temporaries(target)
        _build_locked(setting, spec, key, target, device, log)
        man = read_json(target / MANIFEST)
        index.pin(store, target, index.root_hash(man), "mislabel")
    log(f"mislabel artifact {target}: " + "; ".join(
        f"model {m['k']}: test acc {m['test_accuracy']:.4f}, fits {m['flipped_fit_to_noisy_label']:.2%} of the "
        f"flipped labels" for m in man["models"]))
    return target


def _build_locked(setting: settings_mod.Setting, spec: Spec, key: str, target: Path, device: str, log) -> None:
    from ..setup.training import evaluate, train

    data = setting.data()
    noisy, flipped = corrupt_labels(data.train_y, spec.fraction, data.num_classes, spec.seed)
    recipe = recipe_of(setting, spec)
    target.mkdir(parents=True, exist_ok=True)
    save_npy(target / "flipped.npy", flipped.numpy().astype(np.int64))
    save_npy(target / "labels.npy", noisy.numpy().astype(np.uint8))
    man = {
        "format_version": FORMAT_VERSION, "kind": "mislabel", "setting": setting.name, "version": target.name,
        "complete": False, "spec": dataclasses.asdict(spec), "spec_key": key,
        "corruption": {"fraction": spec.fraction, "seed": spec.seed, "flipped": int(len(flipped)),
                       "function": "benchmark.setup.data.corrupt_labels"},
        "recipe": recipe_record(setting, spec), "recipe_hash": stable_hash(recipe_record(setting, spec)),
        "base_recipe_hash": setting.recipe_hash(), "data": setting.data_spec.to_dict(),
        "environment": environment(device), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(), "models": [], "files": {},
    }
    write_json(target / MANIFEST, man)
    dev = torch.device(device)
    x, y_noisy = data.train_x.to(dev), noisy.to(dev)
    for k in range(spec.full_models):
        ckpt = target / checkpoint_name(k)
        seed = model_seed(setting.name, spec, k)
        if not ckpt.is_file():
            t0 = time.perf_counter()
            log(f"training corrupted-label model {k + 1}/{spec.full_models} for {setting.name} on {device} "
                f"({len(flipped)} of {len(noisy)} labels flipped, {recipe.epochs} epochs)")
            model = train(setting.model(seed), x, y_noisy, recipe, seed)
            save_safetensors(ckpt, model.state_dict(), {"setting": setting.name, "seed": str(seed),
                                                        "seconds": f"{time.perf_counter() - t0:.2f}"})
        model = setting.model(0)
        model.load_state_dict(load_safetensors(ckpt))
        model = model.to(dev).eval()
        ev_noisy = evaluate(model, x, y_noisy)
        ev_clean = evaluate(model, x, data.train_y.to(dev))
        ev_test = evaluate(model, data.test_x.to(dev), data.test_y.to(dev))
        fl = flipped.long()
        man["models"].append({
            "k": k, "seed": seed,
            "train_accuracy_noisy_labels": round(float(ev_noisy["correct"].float().mean()), 5),
            "train_accuracy_true_labels": round(float(ev_clean["correct"].float().mean()), 5),
            "flipped_fit_to_noisy_label": round(float(ev_noisy["correct"][fl].float().mean()), 5),
            "test_accuracy": round(float(ev_test["correct"].float().mean()), 5),
        })
    names = ["flipped.npy", "labels.npy"] + [checkpoint_name(k) for k in range(spec.full_models)]
    man["files"] = file_hashes(target, names)
    man["complete"] = True
    write_json(target / MANIFEST, man)
