"""Floor 3: a ground-truth artifact on disk — finding it, opening it, and checking that it is what it claims.

Artifact layout (``<store>/gt/<setting>/<version>/``, study artifacts under ``gt-studies/``)::

    manifest.json               protocol, recipe + hash, data sha256, environment, files {path: sha256},
                                noise ceiling, summary, hardware per unit, complete flag
    masks.npy                   (M, ceil(N/8)) uint8: subset membership, bit-packed along N
    queries.npy                 (Q,) int64 test indices reported on
    validation_queries.npy      (V,) int64 disjoint test indices for hyper-parameter selection
    units/r{r}_s{j}.npz         outputs (3, Q+V) float32: margin, loss, correct; seconds; seed; hardware
    full/full_k{k}.npz          the same for full-data model k, plus its full test-set accuracy
    full/full_k{k}.safetensors  full-data model k's weights (the model solvers explain)

Opening verifies, in order: the format and the recipe hash against the code; the manifest against its *root
hash* pinned in the store's index (:mod:`.index`: a manifest rewritten after it was committed, its file hashes
included, is refused, and so is a complete artifact with no pin); every file's sha256; and the manifest against
itself — the masks and queries against what the protocol derives, the unit files against the protocol's units
and seeds, each unit's margin, loss and correctness rows against each other, the recorded noise ceiling and
summary against what the files give.

What only the data or retraining can tell — that the full-data models' weights give their recorded outputs
(:meth:`GroundTruth.check_full_models`), that each unit holds the model of its subset (a unit stores its seed, not
its subset: two subsets' units swapped under the shared seed policy pass every check above) — ``tdabench pin``
checks before it pins, so a pin vouches for it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.stats import noise_ceiling
from ..setup import settings as settings_mod
from ..setup.artifacts import (FORMAT_VERSION, MANIFEST, ArtifactError, hardware_key, load_safetensors, read_json,
                               sha256_file, version_folders)
from ..setup.config import Protocol, unit_seed
from ..setup.store import ResultsStore
from . import index
from .index import root_hash
from .protocol import OUTPUT_ROWS, all_units, checkpoint_file, query_indices, subset_indices, unit_file, unit_names

# What the recorded summaries are compared with on verification (they are recomputed from the files).
SUMMARY_RTOL = 1e-9
# A unit's loss against softplus(-margin), and recorded outputs against recomputed ones: float32 round-off. The
# committed artifacts stay within 4e-6 of the identity; a rewritten margin is off by its own size.
ROW_ATOL, ROW_RTOL = 1e-4, 1e-5
# Full test accuracy recomputed from the weights on other hardware: round-off may flip a few near-ties.
FULL_ACCURACY_ATOL = 1e-3


def gt_root(store: ResultsStore, study: bool = False) -> Path:
    """Where ground truths live: the benchmark's, or the study artifacts' (never used as the benchmark's)."""
    return store.gt_studies if study else store.gt


def versions(root: Path, setting_name: str) -> list[Path]:
    return version_folders(Path(root) / setting_name)


def protocol_of(manifest: dict) -> Protocol:
    return Protocol(**manifest["protocol"])


def build_command(manifest: dict, root: Path | None = None, setting: settings_mod.Setting | None = None,
                  store: ResultsStore | None = None) -> str:
    """The ``tdabench gt`` command that resumes (or repairs) the artifact ``manifest`` describes. A build resumes
    only the version with the same protocol, so the command names every protocol value that differs from the
    setting's default, and ``--study`` for a study artifact (plain ``tdabench gt SETTING`` would start or resume
    the default protocol's artifact instead); with ``store``, ``--results`` where it is not the repository's."""
    name = manifest["setting"]
    base = setting.protocols["default"] if setting is not None else None
    words = ["tdabench", *(store.command_words() if store is not None else []), "gt", name]
    if root is not None and settings_mod.DERIVED_SEP not in name and Path(root).parent.parent.name == "gt-studies":
        words.append("--study")
    for f in dataclasses.fields(Protocol):
        value = manifest.get("protocol", {}).get(f.name)
        if value is not None and (base is None or value != getattr(base, f.name)):
            words += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(words)


@dataclass
class GroundTruth:
    """A verified ground-truth artifact in memory.

    ``outputs[m]`` is (R, M, Q+V) float32 for m in margin/loss/correct; NaN marks units not yet built
    (only possible with ``allow_incomplete``). Columns: the Q reported queries, then the V validation ones.
    """

    root: Path
    manifest: dict
    protocol: Protocol
    setting: settings_mod.Setting
    masks: np.ndarray  # (M, N) bool
    queries: np.ndarray
    validation_queries: np.ndarray
    outputs: dict
    full_outputs: dict  # m -> (K, Q+V)
    full_test_accuracy: np.ndarray
    unit_seconds: np.ndarray  # (R, M)
    unit_hardware: dict  # unit name -> hardware key ("" where it was not recorded)
    pinned: bool  # whether the store's index pins this artifact's root hash (False only while it is unfinished)

    @classmethod
    def open(cls, root: Path, setting: settings_mod.Setting, allow_incomplete: bool = False, verify: bool = True,
             store: ResultsStore | None = None) -> "GroundTruth":
        root = Path(root)
        man = read_json(root / MANIFEST)
        hint = f"repair it with `{build_command(man, root, setting)}` (it retrains exactly the damaged units)"
        if man.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{root}: artifact format {man.get('format_version')} is not {FORMAT_VERSION}; {hint}")
        if man.get("setting") != setting.name:
            raise ArtifactError(f"{root} holds the ground truth of {man.get('setting')!r}, not of {setting.name!r}")
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
                f"`{build_command(man, root, setting)}` before using it as ground truth")
        store = store or ResultsStore(root.parents[2])
        pinned = index.check(store, root, root_hash(man))
        if verify:
            bad = damaged_files(root, man)
            if bad:
                shown = "\n  - ".join(bad[:10]) + (f"\n  - ... and {len(bad) - 10} more" if len(bad) > 10 else "")
                raise ArtifactError(f"artifact {root} failed verification:\n  - {shown}\nTo fix: {hint}")
        gt = cls._load(root, man, setting, pinned)
        if verify:
            gt.check_consistency()
        return gt

    @classmethod
    def _load(cls, root: Path, man: dict, setting: settings_mod.Setting, pinned: bool) -> "GroundTruth":
        protocol = protocol_of(man)
        n_train = man["data"]["train_size"]
        masks = np.unpackbits(np.load(root / "masks.npy"), axis=1, count=n_train).astype(bool)
        q = np.load(root / "queries.npy")
        v = np.load(root / "validation_queries.npy")
        n_out = len(q) + len(v)
        outs = {k: np.full((protocol.seeds, protocol.subsets, n_out), np.nan, np.float32) for k in OUTPUT_ROWS}
        secs = np.full((protocol.seeds, protocol.subsets), np.nan)
        full = {k: np.full((protocol.full_models, n_out), np.nan, np.float32) for k in OUTPUT_ROWS}
        acc = np.full(protocol.full_models, np.nan)
        hw = {}
        listed = set(man["files"])
        for u in all_units(protocol):
            path = unit_file(root, u)
            if str(path.relative_to(root)) not in listed:
                continue
            with np.load(path) as z:
                if z["outputs"].shape != (len(OUTPUT_ROWS), n_out):
                    raise ArtifactError(f"{path}: outputs of shape {z['outputs'].shape}, the protocol needs "
                                        f"{(len(OUTPUT_ROWS), n_out)}; the manifest does not describe these files")
                if int(z["seed"]) != unit_seed(protocol, u):
                    raise ArtifactError(f"{path} was trained with seed {int(z['seed'])}, but the protocol gives unit "
                                        f"{u.name} seed {unit_seed(protocol, u)}: the manifest's protocol does not "
                                        f"describe these files")
                hw[u.name] = hardware_key(json.loads(str(z["hardware"]))) if "hardware" in z.files else ""
                if u.subset is None:
                    for i, k in enumerate(OUTPUT_ROWS):
                        full[k][u.replica] = z["outputs"][i]
                    acc[u.replica] = float(z["test_accuracy"])
                else:
                    for i, k in enumerate(OUTPUT_ROWS):
                        outs[k][u.replica, u.subset] = z["outputs"][i]
                    secs[u.replica, u.subset] = float(z["seconds"])
        return cls(root, man, protocol, setting, masks, q, v, outs, full, acc, secs, hw, pinned)

    # -- checks ----------------------------------------------------------------------------------
    def check_consistency(self) -> None:
        """The manifest against itself and the code: masks and queries are what the protocol derives, the files
        are exactly the protocol's units, and the recorded ceiling and summary are what the files give."""
        man, p, root = self.manifest, self.protocol, self.root
        n, n_test = man["data"]["train_size"], man["data"]["test_size"]
        problems = []
        if self.masks.shape != (p.subsets, n):
            problems.append(f"masks.npy holds {self.masks.shape[0]} subsets of {self.masks.shape[1]} points; the "
                            f"protocol says {p.subsets} of {n}")
        else:
            for j in range(p.subsets):
                if not np.array_equal(np.flatnonzero(self.masks[j]), subset_indices(p, n, j)):
                    problems.append(f"masks.npy subset {j} is not the subset the protocol derives")
                    break
        q, v = query_indices(p, n_test)
        if not (np.array_equal(self.queries, q) and np.array_equal(self.validation_queries, v)):
            problems.append("queries.npy / validation_queries.npy are not the queries the protocol derives")
        expected = set(unit_names(p))
        listed = set(man["files"])
        extra = sorted(listed - expected)
        if extra:
            problems.append(f"files the protocol has no unit for: {', '.join(extra[:5])}"
                            + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        units_done = sum(1 for u in all_units(p) if str(unit_file(root, u).relative_to(root)) in listed)
        if man.get("units_total") != len(all_units(p)) or man.get("units_done") != units_done:
            problems.append(f"manifest says {man.get('units_done')}/{man.get('units_total')} units; the protocol and "
                            f"the files give {units_done}/{len(all_units(p))}")
        if man.get("complete") and (listed != expected):
            problems.append(f"marked complete but {len(expected - listed)} of the protocol's files are missing")
        if not man.get("complete") and listed == expected:  # a build finalizes (and pins) once every unit is in
            problems.append(f"every unit is present but the manifest is not marked complete; if a build was "
                            f"interrupted while finishing, finish it with `{build_command(man, root, self.setting)}`")
        problems += self._output_row_problems()
        if man.get("complete"):
            for key, recorded, now in (("noise_ceiling", man.get("noise_ceiling"), self.ceilings()),
                                       ("summary", man.get("summary"), self.summary())):
                if not _close(recorded, json.loads(json.dumps(now))):
                    problems.append(f"the recorded {key} is not what the files give (recorded {_brief(recorded)}, "
                                    f"recomputed {_brief(now)})")
        if problems:
            raise ArtifactError(f"{root}: the manifest does not describe its files: " + "; ".join(problems)
                                + f". The artifact was edited by hand or by other code. Restore it from version "
                                  f"control (`git checkout -- {root}`), or build a new version.")

    def _output_row_problems(self) -> list[str]:
        """Each unit's three output rows against each other: the loss is softplus(-margin) (the margin is the
        correct logit minus the log-sum-exp of the others), and a positive margin is a correct prediction. Catches
        margins (or losses) rewritten alone, e.g. negated, which the noise ceiling and summary cannot see."""
        problems = []
        for what, arrays in (("subset unit", self.outputs), ("full-data model", self.full_outputs)):
            m, loss, correct = (np.asarray(arrays[k], np.float64) for k in OUTPUT_ROWS)
            done = np.isfinite(m) & np.isfinite(loss) & np.isfinite(correct)
            with np.errstate(invalid="ignore"):  # NaN marks a unit not built yet
                off = np.abs(loss - np.logaddexp(0.0, -m)) > ROW_ATOL + ROW_RTOL * np.abs(loss)
                wrong = ~np.isin(correct, (0.0, 1.0)) | ((m > 0) & (correct != 1))
            bad = done & (off | wrong)
            if bad.any():
                where = np.argwhere(bad.reshape(-1, bad.shape[-1]).any(axis=-1)).ravel()
                problems.append(f"{len(where)} {what}(s) hold output rows that contradict each other (loss is not "
                                f"softplus(-margin), or a positive margin is not a correct prediction), in "
                                f"{int(bad.sum())} of {int(done.sum())} values: margins or losses were rewritten")
        return problems

    def check_full_models(self) -> None:
        """Recompute what the full-data models' weights give: their query outputs and full test accuracy must be the
        recorded ones, to float round-off. Needs the setting's data; `tdabench pin` runs it."""
        from ..setup.training import evaluate

        data = self.setting.data()
        cols = torch.from_numpy(np.concatenate([self.queries, self.validation_queries]))
        problems = []
        for k in range(self.protocol.full_models):
            if not checkpoint_file(self.root, k).is_file():
                continue
            model = self.full_model(k)
            with torch.no_grad():
                ev = evaluate(model, data.test_x[cols], data.test_y[cols])
                acc = float(evaluate(model, data.test_x, data.test_y)["correct"].float().mean())
            m = ev["margin"].numpy().astype(np.float64)
            recorded = self.full_outputs["margin"][k].astype(np.float64)
            if not np.allclose(m, recorded, rtol=ROW_RTOL, atol=ROW_ATOL):
                problems.append(f"full-data model {k}'s weights give margins up to {np.abs(m - recorded).max():.3g} "
                                f"away from the recorded ones (full/full_k{k:02d}.npz)")
            if abs(acc - self.full_test_accuracy[k]) > FULL_ACCURACY_ATOL:
                problems.append(f"full-data model {k}'s weights give test accuracy {acc:.5f}, the record says "
                                f"{self.full_test_accuracy[k]:.5f}")
        if problems:
            raise ArtifactError(f"{self.root}: the full-data models' weights are not the models its outputs were "
                                f"recorded from: " + "; ".join(problems) + ". Restore it from version control "
                                f"(`git checkout -- {self.root}`), or build a new version.")

    def ceilings(self) -> dict:
        """The noise ceiling of the reported queries, for both measurements (what finalize records)."""
        q = len(self.queries)
        return {m: noise_ceiling(self.outputs[m][:, :, :q]) for m in ("margin", "loss")}

    # -- use -------------------------------------------------------------------------------------
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

    def full_model(self, k: int = 0) -> torch.nn.Module:
        path = checkpoint_file(self.root, k)
        if not path.is_file():
            raise ArtifactError(f"{self.root}: full-data model {k} has not been built yet")
        model = self.setting.model(0)
        model.load_state_dict(load_safetensors(path))
        return model.eval()

    def root_hash(self) -> str:
        return root_hash(self.manifest)

    def hardware_groups(self) -> dict[str, list[str]]:
        """{hardware: [units]} — more than one key means the build moved between machines."""
        groups: dict[str, list[str]] = {}
        for name, key in self.unit_hardware.items():
            groups.setdefault(key or "not recorded (built before units recorded their hardware)", []).append(name)
        return groups

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


def damaged_files(root: Path, manifest: dict) -> list[str]:
    """The listed files that are missing or whose sha256 differs from the manifest's."""
    problems = []
    for name, digest in manifest.get("files", {}).items():
        path = Path(root) / name
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch for {path} (corrupt or modified)")
    return problems


def _close(a, b) -> bool:
    """Recorded summaries against recomputed ones: equal structure, numbers equal to a relative 1e-9."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=SUMMARY_RTOL, atol=1e-12))
    return a == b


def _brief(obj) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) < 160 else text[:157] + "..."


def latest(root: Path, setting: settings_mod.Setting, allow_incomplete: bool = False) -> Path:
    """The newest version of a setting's ground truth under ``root`` (complete ones only unless
    ``allow_incomplete``)."""
    found, unfinished = [], []
    for path in versions(root, setting.name):
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError:
            continue
        if man.get("complete") or allow_incomplete:
            found.append(path)
        else:
            unfinished.append((f"{path.name} ({man.get('units_done')}/{man.get('units_total')} units)",
                               build_command(man, path, setting)))
    if not found and unfinished:
        raise ArtifactError(f"the ground truth for {setting.name!r} is incomplete: "
                            f"{', '.join(u for u, _ in unfinished)}; finish it with `{unfinished[-1][1]}` (it resumes)")
    if not found:
        raise ArtifactError(f"no {'' if allow_incomplete else 'complete '}ground truth for {setting.name!r} under "
                            f"{Path(root) / setting.name}; build it with `tdabench gt {setting.name}`")
    return found[-1]


def current(store: ResultsStore, setting: settings_mod.Setting) -> Path | None:
    """The artifact the benchmark uses now: the newest complete version, else the newest unfinished one
    (evaluated on its complete replicas, flagged), else None."""
    for allow in (False, True):
        try:
            return latest(store.gt, setting, allow)
        except ArtifactError:
            continue
    return None


def load(store: ResultsStore, setting: settings_mod.Setting, version: str | None = None, study: bool = False,
         allow_incomplete: bool = False) -> GroundTruth:
    root = gt_root(store, study)
    path = Path(root) / setting.name / version if version else latest(root, setting, allow_incomplete)
    return GroundTruth.open(path, setting, allow_incomplete=allow_incomplete, store=store)


def verify(store: ResultsStore, setting: settings_mod.Setting, version: str | None = None, study: bool = False) -> dict:
    """Verify an artifact fully (checksums, recipe, pinned root hash, consistency) and return a summary."""
    gt = load(store, setting, version, study, allow_incomplete=True)
    man = gt.manifest
    groups = gt.hardware_groups()
    return {
        "artifact": str(gt.root),
        "complete": man["complete"],
        "units": f"{man['units_done']}/{man['units_total']}",
        "protocol": man["protocol"],
        "recipe_hash": man["recipe_hash"],
        "root_hash": gt.root_hash(),
        "pinned": gt.pinned,
        "files_verified": len(man["files"]),
        "noise_ceiling": man.get("noise_ceiling"),
        "summary": gt.summary(),
        "hardware": {key: len(units) for key, units in groups.items()},
        "mixed_hardware": len(groups) > 1,
    }
