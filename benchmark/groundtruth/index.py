"""Floor 3: the pinned root hash of every finished artifact, in one small committed file (``<store>/index.json``).

A manifest lists the sha256 of each of its files, so a damaged file is caught on load. But a file changed
*together with* its hash in the manifest would pass that check. The root hash (a hash over the manifest's
identity: protocol, recipe, data and every file's sha256) is pinned here when an artifact is finished; opening
an artifact whose root hash differs from its pin is refused, and every run record carries the root hash it was
computed on. The index is small and reviewed in version control: a tampered artifact shows up as a changed pin.

A build pins what it finishes (:func:`holds_finished_work`), so a finished artifact without a pin was changed, or
its entry lost, outside a build: opening it is refused (:func:`check`) until ``tdabench pin`` has verified it
again, and every number still derived from it is marked UNPINNED (:func:`unpinned`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shlex
from pathlib import Path

from ..setup.artifacts import FORMAT_VERSION, MANIFEST, ArtifactError, atomic_write_bytes, read_json, verify_files
from ..setup.config import stable_hash
from ..setup.store import ResultsStore

FORMAT = 1
# What an artifact *is*; what can be recomputed from it (ceilings, summaries, timings) stays out.
IDENTITY_KEYS = ("format_version", "kind", "setting", "protocol", "spec", "recipe_hash", "data", "files")


def root_hash(manifest: dict) -> str:
    """The hash that identifies an artifact: over its identity (format, kind, setting, protocol or spec, recipe,
    data and the sha256 of every file), not over what can be recomputed from it."""
    return stable_hash({k: manifest.get(k) for k in IDENTITY_KEYS}, 64)


def read(store: ResultsStore) -> dict:
    path = store.index
    if not path.is_file():
        return {"format": FORMAT, "artifacts": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); restore it from version control") from None
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {data.get('format')}, this code reads {FORMAT}")
    return data


def pinned(store: ResultsStore, root: Path) -> str | None:
    """The root hash pinned for the artifact at ``root``, or None."""
    entry = read(store)["artifacts"].get(store.relative(root))
    return None if entry is None else entry["root_hash"]


def holds_finished_work(manifest: dict) -> bool:
    """Whether a build has pinned an artifact with this manifest: a ground truth or a mislabel artifact once complete,
    a model zoo once it holds a model, a retraining artifact once it holds a unit (those two grow, pinned as their
    work lands). An unfinished ground truth is never pinned: it is flagged as incomplete wherever it is used."""
    return bool(manifest.get("complete") or manifest.get("models")
                or (manifest.get("kind") == "retrain" and manifest.get("units_done")))


def pin_command(store: ResultsStore, root: Path) -> str:
    """The `tdabench pin` command for the artifact at ``root``, with ``--results`` where the store needs it."""
    return shlex.join(["tdabench", *store.command_words(), "pin", store.relative(root)])


def not_pinned_message(store: ResultsStore, root: Path) -> str:
    return (f"{store.relative(root)} is UNPINNED: it is finished, but {store.index} pins no root hash for it (its "
            f"entry was deleted or lost, or the artifact was made or changed outside a build). Restore both from "
            f"version control; if the artifact is your own build or a reviewed change, pin it with "
            f"`{pin_command(store, root)}`, which verifies it first")


def unpinned(store: ResultsStore, root: Path) -> str | None:
    """'UNPINNED: …' (why nothing derived from the artifact at ``root`` can be trusted now) when it holds finished
    work but the store's index pins no root hash for it; else None."""
    if pinned(store, root) is not None or not holds_finished_work(read_json(Path(root) / MANIFEST)):
        return None
    return (f"UNPINNED: {store.relative(root)} is finished but {store.index.name} pins no root hash for it; restore "
            f"both from version control, or verify and pin it with `{pin_command(store, root)}`")


# Artifact folders `tdabench pin` is verifying, with the root hash it would pin: opening one checks against that.
_VERIFYING: dict[str, str] = {}


@contextlib.contextmanager
def verifying(root: Path, candidate: str):
    """Open the artifact at ``root`` as if ``candidate`` were its pin, to verify it before pinning (nothing written)."""
    key = str(Path(root).resolve())
    _VERIFYING[key] = candidate
    try:
        yield
    finally:
        _VERIFYING.pop(key, None)


def check(store: ResultsStore, root: Path, root_hash: str) -> bool:
    """True when ``root`` is pinned with ``root_hash``; False when it is not pinned and holds no finished work (a build
    in progress); an error when the pin differs, or when a finished artifact is not pinned."""
    pin = _VERIFYING.get(str(Path(root).resolve())) or pinned(store, root)
    if pin is None:
        if holds_finished_work(read_json(Path(root) / MANIFEST)):
            raise ArtifactError(not_pinned_message(store, root))
        return False
    if pin != root_hash:
        raise ArtifactError(
            f"{root}: its manifest's root hash {root_hash[:16]}… differs from the one pinned in {store.index} "
            f"({pin[:16]}…): the artifact was changed after it was finished (files rewritten together with their "
            f"hashes in the manifest). Restore it from version control (`git checkout -- {root}`); if the change is "
            f"deliberate and reviewed, pin it again with `{pin_command(store, root)}` (it verifies it first).")
    return True


def pin(store: ResultsStore, root: Path, root_hash: str, kind: str) -> None:
    data = read(store)
    data["artifacts"][store.relative(root)] = {
        "kind": kind, "root_hash": root_hash,
        "pinned": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    data["artifacts"] = dict(sorted(data["artifacts"].items()))
    atomic_write_bytes(store.index, (json.dumps(data, indent=2) + "\n").encode())


def open_manifest(store: ResultsStore, root: Path, kind: str, what: str, setting, stale_hint: str,
                  damaged_hint: str | None) -> dict:
    """The manifest of the ``kind`` artifact at ``root``, checked before anything is read from it: its format, that
    it holds ``setting``'s models, its pinned root hash, that they were trained with the setting's current recipe
    (``stale_hint`` says how to get a current one) and, unless ``damaged_hint`` is None, every file's sha256
    (``damaged_hint`` says how to repair one)."""
    root = Path(root)
    man = read_json(root / MANIFEST)
    if man.get("kind") != kind or man.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{root} is not a {what} artifact of format {FORMAT_VERSION}")
    if man.get("setting") != setting.name:
        raise ArtifactError(f"{root} holds models of {man.get('setting')!r}, not of {setting.name!r}")
    check(store, root, root_hash(man))
    if man["recipe_hash"] != setting.recipe_hash():
        raise ArtifactError(f"{root} is stale: its models were trained with recipe {man['recipe_hash']}, the code "
                            f"now has {setting.recipe_hash()}; {stale_hint}")
    if damaged_hint is not None:
        verify_files(root, man["files"], damaged_hint)
    return man
