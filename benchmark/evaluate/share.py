"""Floor 4: a setting's precomputed results as one bundle — exported from a results folder, fetched into another.

A setting's bundle holds its pinned ground truth, explained-model zoo and mislabel artifacts (every pinned version
under ``gt/``, ``models/``, ``mislabel/``) and its run records (``runs/<setting>/``), in the file format of
:mod:`benchmark.setup.bundle`. Export writes only what verifies. Fetch trusts a bundle only when its root hash is
the one pinned in the package (or given by the caller); it unpacks into a staging folder inside the target
results folder, opens every artifact there with the project's own verification (``GroundTruth.open``,
``Zoo.open``, ``mislabel.open_artifact``) and checks every record against itself, and only then moves the new
artifacts and records into place and pins their root hashes in the target's ``index.json`` (merged; another
version of an artifact already there, or a different file, is refused, never overwritten).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..groundtruth import index
from ..groundtruth import mislabel as mislabel_mod
from ..groundtruth import zoo as zoo_mod
from ..groundtruth.artifact import GroundTruth
from ..setup import bundle
from ..setup import settings as settings_mod
from ..setup.artifacts import (MANIFEST, ArtifactError, ArtifactLock, read_json, sha256_file, verify_files,
                               version_folders)
from ..setup.data import DataError
from ..setup.store import ResultsStore
from . import records

ARTIFACT_FOLDERS = ("gt", "models", "mislabel")
# The kind the results index records for each artifact folder.
INDEX_KINDS = {"gt": "ground truth", "models": "model zoo", "mislabel": "mislabel"}
SCRATCH = ".fetch"  # staging folders of fetches in progress, inside the target results folder


# ---------------------------------------------------------------- what a setting's bundle holds

def pinned_artifacts(store: ResultsStore, setting: settings_mod.Setting, log=print) -> dict:
    """{"gt/<setting>/v1": {"kind", "root_hash"}} for every version of the setting's ground truth, zoo and mislabel
    artifacts that ``store``'s index pins (an unpinned one is unfinished or unreviewed, and left out)."""
    pins = index.read(store)["artifacts"]
    found = {}
    for folder in ARTIFACT_FOLDERS:
        for path in version_folders(store.root / folder / setting.name):
            rel = store.relative(path)
            if rel not in pins:
                log(f"note: {rel} is not pinned in {store.index}; left out of the bundle")
                continue
            found[rel] = {"kind": pins[rel]["kind"], "root_hash": pins[rel]["root_hash"]}
    if not any(rel.startswith("gt/") for rel in found):
        raise ArtifactError(f"no pinned ground truth of {setting.name!r} under {store.gt / setting.name}; build it "
                            f"with `tdabench gt {setting.name}` (a finished build pins itself) before exporting")
    return found


def verify_artifacts(store: ResultsStore, setting: settings_mod.Setting, artifacts: dict, log=print) -> list[str]:
    """Open every artifact with its own verification (checksums, pinned root hash, recipe, consistency); one line
    per artifact says what was checked. Raises ArtifactError at the first that fails."""
    done = []
    for rel, entry in artifacts.items():
        root = store.root / rel
        folder = rel.split("/")[0]
        if index.root_hash(read_json(root / MANIFEST)) != entry["root_hash"]:
            raise ArtifactError(f"{root}: its manifest's root hash is not the {entry['root_hash'][:16]}… the bundle "
                                f"lists for it; refused")
        if folder == "gt":
            gt = GroundTruth.open(root, setting, store=store)
            if not gt.pinned:
                raise ArtifactError(f"{root} is not pinned in {store.index}; refused")
            done.append(f"{rel}: checksums, pinned root hash, recipe, protocol, ceiling and summary")
        elif folder == "models":
            zoo_mod.Zoo.open(store, root, setting, verify=True)
            done.append(f"{rel}: checksums, pinned root hash and recipe")
        else:
            try:
                mislabel_mod.open_artifact(store, root, setting, verify=True)
                done.append(f"{rel}: checksums, pinned root hash, recipe and the label flips recomputed")
            except DataError:  # the flips are re-derived from the data, which may not be on this machine
                art = mislabel_mod.open_artifact(store, root, setting, verify=False)
                verify_files(root, art.manifest["files"], "get the bundle again")
                log(f"note: {rel}: label flips not recomputed: {setting.name}'s data is not here (`tdabench data "
                    f"{setting.name}` gets it)")
                done.append(f"{rel}: checksums, pinned root hash and recipe (flips not recomputed: no data here)")
    return done


def record_files(store: ResultsStore, setting: settings_mod.Setting) -> list[Path]:
    folder = store.runs / setting.name
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []


def verify_records(store: ResultsStore, setting: settings_mod.Setting, files: list[Path]) -> int:
    """Check every run record against itself (its numbers and content hash); raises RecordError at the first."""
    for path in files:
        method, ensemble = records.parse_row_name(path.stem)
        records.read_record(store, setting.name, method, ensemble)
    return len(files)


def _members(store: ResultsStore, artifacts: dict, runs: list[Path]) -> dict:
    names = []
    for rel in artifacts:
        man = read_json(store.root / rel / MANIFEST)
        names += [f"{rel}/{MANIFEST}"] + [f"{rel}/{n}" for n in man["files"]]
    names += [store.relative(p) for p in runs]
    return {n: {"sha256": sha256_file(store.root / n), "bytes": (store.root / n).stat().st_size} for n in names}


def manifest(store: ResultsStore, setting: settings_mod.Setting, *, verify: bool = True, log=print) -> dict:
    """The manifest (and root hash) of the bundle ``store`` gives for ``setting``; with ``verify``, only after every
    artifact and record in it verified."""
    artifacts = pinned_artifacts(store, setting, log)
    runs = record_files(store, setting)
    if verify:
        for line in verify_artifacts(store, setting, artifacts, log):
            log(f"verified {line}")
        log(f"verified {verify_records(store, setting, runs)} run records of {setting.name} (numbers and content hash)")
    return bundle.make_manifest(setting.name, setting.recipe_hash(), artifacts, _members(store, artifacts, runs))


def export(store: ResultsStore, setting: settings_mod.Setting, out_dir: Path, *, pin: bool = False,
           pins_path: Path | None = None, progress: bool = True, log=print) -> tuple[Path, dict]:
    """Write ``setting``'s bundle into ``out_dir`` (named by its root hash); with ``pin``, record its root hash as
    the package's pinned bundle of the setting. Returns the file and its manifest."""
    man = manifest(store, setting, log=log)
    path = Path(out_dir) / bundle.file_name(man)
    bundle.write(path, store.root, man, progress)
    if pin:
        bundle.pin(man, path, pins_path)
    return path, man


# ---------------------------------------------------------------- fetching into a results folder

def _plan(store: ResultsStore, man: dict) -> dict:
    """What a fetch of ``man`` into ``store`` moves, keeps (already there, byte for byte) and pins. Refuses, before
    anything is written, a bundle whose layout is not a setting's, and anything that would replace what is there."""
    setting = man["setting"]
    arts = man["artifacts"]
    for rel in arts:
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in ARTIFACT_FOLDERS or not parts[2].startswith("v") \
                or not parts[2][1:].isdigit():
            raise bundle.BundleError(f"bundle artifact {rel!r} is not a <gt|models|mislabel>/{setting}/v<N> folder; "
                                     f"refused")
    loose = [n for n in man["members"] if not any(n.startswith(rel + "/") for rel in arts)]
    for name in loose:
        parts = name.split("/")
        if len(parts) != 3 or parts[0] != "runs" or not parts[2].endswith(".json"):
            raise bundle.BundleError(f"bundle member {name!r} belongs to no artifact and is no run record; refused")
    pins = index.read(store)["artifacts"]
    plan = {"move": [], "keep": [], "pin": []}
    for rel, entry in arts.items():
        there = (pins.get(rel) or {}).get("root_hash")
        if there is not None and there != entry["root_hash"]:
            raise bundle.BundleError(
                f"{store.index} pins {rel} with root hash {there[:16]}…, the bundle holds "
                f"{entry['root_hash'][:16]}…: another version of it is there; fetch into another --results folder")
        if (store.root / rel).exists():
            files = {n: e for n, e in man["members"].items() if n.startswith(rel + "/")}
            bad = next((n for n, e in files.items() if not bundle.same_file(store.root / n, e)), None)
            if bad is not None:
                raise bundle.BundleError(f"{store.root / rel} is already there and differs from the bundle's ({bad}); "
                                         f"move it away, or fetch into another --results folder")
            plan["keep"].append(rel)
        else:
            plan["move"].append(rel)
        if there is None:
            plan["pin"].append(rel)
    for name in loose:
        if (store.root / name).exists():
            if not bundle.same_file(store.root / name, man["members"][name]):
                raise bundle.BundleError(f"{store.root / name} is already there and differs from the bundle's; move it "
                                         f"away, or fetch into another --results folder")
            plan["keep"].append(name)
        else:
            plan["move"].append(name)
    return plan


def _commit(staged: Path, store: ResultsStore, plan: dict, man: dict) -> None:
    """Move the verified artifacts and records into place and pin them: renames within one file system, with Ctrl-C
    held back, and undone if one fails, so the target gets all of the bundle or none of it."""
    moved = []
    with bundle.interrupts_deferred():
        try:
            for rel in plan["move"]:
                src, dst = staged / rel, store.root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    os.rename(src, dst)  # fails on a folder that appeared meanwhile and is not empty
                else:
                    os.link(src, dst)  # never replaces a file that appeared meanwhile
                    os.unlink(src)
                moved.append(rel)
        except OSError:
            for rel in reversed(moved):
                os.rename(store.root / rel, staged / rel)
            raise
        for rel in plan["pin"]:
            entry = man["artifacts"][rel]
            index.pin(store, store.root / rel, entry["root_hash"], entry["kind"])


@contextlib.contextmanager
def _staging(store: ResultsStore, setting: settings_mod.Setting):
    """A fresh staging folder inside ``store`` (same file system: moving out of it is a rename), held under a lock so
    that one fetch at a time writes into a results folder; what a killed fetch left is removed first, and the
    scratch folder itself once it is empty again."""
    scratch = store.root / SCRATCH
    lock = ArtifactLock(scratch)
    try:
        lock.__enter__()
    except ArtifactError:
        raise bundle.BundleError(f"another fetch is writing into {store.root} ({lock.path.read_text().strip()}); wait "
                                 f"for it to finish and run the command again") from None
    try:
        for stale in scratch.iterdir():  # the lock says no other fetch is running
            if stale.name != lock.path.name:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        work = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{setting.name}."))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if [p.name for p in scratch.iterdir()] == [lock.path.name]:
                lock.path.unlink()
                scratch.rmdir()
    finally:
        lock.__exit__(None, None, None)


def fetch(store: ResultsStore, setting: settings_mod.Setting, source: str, *, expected_root: str | None = None,
          pins_path: Path | None = None, progress: bool = True, log=print) -> dict:
    """Verify the bundle at ``source`` (a file or an http(s) URL) and unpack it into ``store``; returns what was
    moved, kept and pinned. The bundle's root hash must be ``expected_root``, else the one the package pins.
    A refused bundle leaves the results folder as it was."""
    expected = expected_root or bundle.pinned(setting.name, pins_path)
    if expected is None:
        raise bundle.BundleError(f"this package pins no bundle of {setting.name!r} (benchmark/setup/"
                                 f"{bundle.PINS.name}); pass the root hash you trust with --root-hash HASH "
                                 f"(`tdabench export` prints it)")
    with tempfile.TemporaryDirectory(prefix="tdabench-download-") as download:
        path = bundle.local_copy(source, Path(download), progress)
        man = bundle.read_manifest(path, setting.name, expected)
        plan = _plan(store, man)
        fresh = not store.root.exists()
        store.check_writable()
        try:
            with _staging(store, setting) as work:
                need = sum(e["bytes"] for e in man["members"].values())
                free = shutil.disk_usage(work).free
                if need > free:
                    raise bundle.BundleError(f"the bundle unpacks to {need / 2**20:.0f} MiB, {store.root} has "
                                             f"{free / 2**20:.0f} MiB free; free some space and run the command again")
                staged = work / "results"
                bundle.extract(path, staged, setting.name, expected, progress)
                staged_store = ResultsStore(staged)
                for rel, entry in man["artifacts"].items():
                    index.pin(staged_store, staged / rel, entry["root_hash"], entry["kind"])
                checked = verify_artifacts(staged_store, setting, man["artifacts"], log)
                n_records = verify_records(staged_store, setting, [staged / n for n in man["members"]
                                                                   if n.startswith("runs/")])
                _commit(staged, store, plan, man)
        except BaseException:
            if fresh:  # a folder this fetch made and left empty goes too
                with contextlib.suppress(OSError):
                    store.root.rmdir()
            raise
    return {"setting": setting.name, "root_hash": man["root_hash"], "results": str(store.root),
            "moved": plan["move"], "kept": plan["keep"], "pinned": plan["pin"], "verified": checked,
            "records": n_records}
