"""Floor 2: the bundle file format — a setting's precomputed results as one checksummed, deterministic file.

A bundle is a gzip'd tar. Its first member, ``tdabench-bundle.json``, lists every other member with its sha256
and size, and every artifact in it with the root hash its results index pins; the bundle's **root hash** is a
hash over that list (not over the compressed bytes, so a zlib of another version cannot change it). The pinned
root hashes of the project's own bundles travel with the package, in ``bundles.json`` beside this module: a user
of an installed wheel has no ``results/index.json`` to trust, but has this file.

Writing is deterministic (members in sorted order, mtime 0, owner 0, mode 0644, a gzip header without a name or a
time), so the same files give the same bytes and a pin stays valid. Reading refuses, before anything leaves the
staging folder it is given: a root hash that is not the expected one, a member whose name leaves its setting's
folders (``../x``, absolute paths, links), a member that is not listed, listed twice, of another size or sha256,
and a truncated file. What the members *mean* (that the artifacts open and verify) is checked a floor up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from .artifacts import ArtifactError, atomic_write_bytes, sha256_file
from .config import stable_hash

FORMAT = 1
KIND = "tdabench bundle"
MANIFEST_NAME = "tdabench-bundle.json"
PINS = Path(__file__).with_name("bundles.json")
# The results folders a setting's bundle may write into: <folder>/<setting>/...
FOLDERS = ("gt", "models", "mislabel", "runs")
IDENTITY_KEYS = ("format", "kind", "setting", "recipe_hash", "artifacts", "members")
MAX_MANIFEST_BYTES = 16 << 20
CHUNK = 1 << 20


class BundleError(ArtifactError):
    """A bundle that is not the one expected, is damaged, or would write outside its setting's folders."""


def root_hash(manifest: dict) -> str:
    """The hash that identifies a bundle: over its setting, recipe, artifacts (with their root hashes) and every
    member's sha256 and size."""
    return stable_hash({k: manifest.get(k) for k in IDENTITY_KEYS}, 64)


def make_manifest(setting_name: str, recipe_hash: str, artifacts: dict, members: dict) -> dict:
    """``artifacts``: {"gt/<setting>/v1": {"kind", "root_hash"}}; ``members``: {path: {"sha256", "bytes"}}."""
    man = {"format": FORMAT, "kind": KIND, "setting": setting_name, "recipe_hash": recipe_hash,
           "artifacts": dict(sorted(artifacts.items())), "members": dict(sorted(members.items()))}
    for name in man["members"]:
        check_member_name(name, setting_name)
    man["root_hash"] = root_hash(man)
    return man


def file_name(manifest: dict) -> str:
    """A bundle's file name: its setting and the start of its root hash (a new content is a new name)."""
    return f"tdabench-{manifest['setting']}-{manifest['root_hash'][:12]}.tar.gz"


def check_member_name(name: str, setting_name: str) -> None:
    """Refuse a member that could write anywhere but ``<gt|models|mislabel|runs>/<setting>/``."""
    path = PurePosixPath(name)
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts)
            or str(path) != name):
        raise BundleError(f"bundle member {name!r} is not a plain relative path (path traversal refused); the bundle "
                          f"is malformed or malicious: get it again from where it was published")
    if len(parts) < 3 or parts[0] not in FOLDERS or parts[1] != setting_name:
        raise BundleError(f"bundle member {name!r} lies outside {setting_name}'s folders "
                          f"({', '.join(f'{f}/{setting_name}/' for f in FOLDERS)}); refused")


# ---------------------------------------------------------------- writing

def write(path: Path, source_root: Path, manifest: dict, progress: bool = True) -> None:
    """Write the bundle ``manifest`` describes, its members read from ``source_root``, atomically at ``path``."""
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    blob = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    total = sum(m["bytes"] for m in manifest["members"].values())
    try:
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar, \
                tqdm(total=total, unit="B", unit_scale=True, desc=f"bundle {manifest['setting']}",
                     disable=not progress, leave=False) as bar:
            tar.addfile(_info(MANIFEST_NAME, len(blob)), io.BytesIO(blob))
            for name, entry in manifest["members"].items():
                reader = _Reader(open(Path(source_root) / name, "rb"), bar)
                with reader.f:
                    tar.addfile(_info(name, entry["bytes"]), reader)
                # A file rewritten since its sha256 was taken would make a bundle that no fetch accepts.
                if reader.digest.hexdigest() != entry["sha256"] or reader.size != entry["bytes"]:
                    raise BundleError(f"{Path(source_root) / name} changed while it was being exported; export again")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on nothing but the name and size (no time, owner or permission bits)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _Reader:
    """A file object that hashes what tarfile reads from it and advances a progress bar."""

    def __init__(self, f, bar):
        self.f, self.bar, self.digest, self.size = f, bar, hashlib.sha256(), 0

    def read(self, n=-1):
        block = self.f.read(n)
        self.digest.update(block)
        self.size += len(block)
        self.bar.update(len(block))
        return block


# ---------------------------------------------------------------- the source: a file or a URL

def is_url(source: str) -> bool:
    return str(source).split("://", 1)[0].lower() in ("http", "https", "file") and "://" in str(source)


def local_copy(source: str, scratch: Path, progress: bool = True) -> Path:
    """``source`` as a local file: a path as it is, a URL downloaded into ``scratch`` (urllib, with
    ``$TDABENCH_NETWORK_TIMEOUT``; refused under ``$TDABENCH_OFFLINE``)."""
    from .data import network_timeout, offline_mode

    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise BundleError(f"bundle {path} does not exist (or is not a file); pass the bundle file, or its URL, "
                              f"with --from")
        return path
    if offline_mode():
        raise BundleError(f"TDABENCH_OFFLINE is set, so {source} is not downloaded; download the bundle yourself and "
                          f"pass the file with --from PATH, or unset TDABENCH_OFFLINE")
    from tqdm.auto import tqdm

    target = Path(scratch) / "download.tar.gz"
    try:
        with urllib.request.urlopen(source, timeout=network_timeout()) as resp, open(target, "wb") as out:
            size = resp.headers.get("Content-Length")
            with tqdm(total=int(size) if size and size.isdigit() else None, unit="B", unit_scale=True,
                      desc="download", disable=not progress, leave=False) as bar:
                while block := resp.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise BundleError(f"cannot download {source}: {why}; check the address and the network (the wait is "
                          f"$TDABENCH_NETWORK_TIMEOUT seconds), or download it yourself and pass --from PATH") from None
    return target


# ---------------------------------------------------------------- reading

def read_manifest(path: Path, setting_name: str, expected_root: str) -> dict:
    """The bundle's manifest, checked: it is a bundle of ``setting_name`` whose root hash is ``expected_root`` and
    whose member names stay in the setting's folders. Reads only the first member."""
    with _opened(path) as tar:
        return _manifest(tar, path, setting_name, expected_root)


def extract(path: Path, staging: Path, setting_name: str, expected_root: str, progress: bool = True) -> dict:
    """Unpack the bundle at ``path`` into ``staging`` (an empty folder), checking everything the format can: the
    root hash against ``expected_root``, every member's name, type, size and sha256, and that every listed member
    is there. Returns the manifest. On any error, what was unpacked is left for the caller to delete."""
    from tqdm.auto import tqdm

    staging = Path(staging)
    with _opened(path) as tar:
        man = _manifest(tar, path, setting_name, expected_root)
        members, seen = man["members"], set()
        with tqdm(total=sum(m["bytes"] for m in members.values()), unit="B", unit_scale=True,
                  desc=f"unpack {setting_name}", disable=not progress, leave=False) as bar:
            while (info := _next(tar, path)) is not None:
                name = info.name
                check_member_name(name, setting_name)
                if name not in members:
                    raise BundleError(f"{path}: member {name!r} is not listed in the bundle's manifest; refused")
                if name in seen:
                    raise BundleError(f"{path}: member {name!r} appears twice; refused")
                if not info.isreg():
                    raise BundleError(f"{path}: member {name!r} is a link or a folder, not a file; refused")
                if info.size != members[name]["bytes"]:
                    raise BundleError(f"{path}: member {name!r} holds {info.size} bytes, the manifest says "
                                      f"{members[name]['bytes']}: the bundle was modified; get it again")
                seen.add(name)
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                src = tar.extractfile(info)
                with open(target, "xb") as out:
                    while block := _read(src, path):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
                if digest.hexdigest() != members[name]["sha256"]:
                    raise BundleError(f"{path}: member {name!r} does not match its sha256 in the manifest (tampered "
                                      f"or corrupt); nothing was written, get the bundle again")
    missing = sorted(set(members) - seen)
    if missing:
        raise BundleError(f"{path} is truncated: {len(missing)} of its {len(members)} members are missing (first "
                          f"{missing[0]}); nothing was written, get the bundle again")
    return man


@contextlib.contextmanager
def _opened(path: Path):
    try:
        tar = tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"{path} is not a tdabench bundle (a gzip'd tar): {exc}; get it again") from None
    with tar:
        yield tar


def _damaged(path: Path, exc: BaseException) -> BundleError:
    return BundleError(f"{path} is truncated or damaged ({exc}); nothing was written, get the bundle again")


def _next(tar: tarfile.TarFile, path: Path):
    try:
        return tar.next()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(path, exc) from None


def _read(src, path: Path) -> bytes:
    try:
        return src.read(CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(path, exc) from None


def _manifest(tar: tarfile.TarFile, path: Path, setting_name: str, expected_root: str) -> dict:
    info = _next(tar, path)
    if info is None or info.name != MANIFEST_NAME or not info.isreg() or info.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is not a tdabench bundle: its first member is not {MANIFEST_NAME}")
    src = tar.extractfile(info)
    blob = b"".join(iter(lambda: _read(src, path), b""))
    try:
        man = json.loads(blob)
    except ValueError:
        raise BundleError(f"{path}: {MANIFEST_NAME} is not valid JSON; the bundle is damaged, get it again") from None
    if not isinstance(man, dict) or man.get("kind") != KIND or man.get("format") != FORMAT:
        raise BundleError(f"{path} is not a tdabench bundle of format {FORMAT}")
    if man.get("setting") != setting_name:
        raise BundleError(f"{path} is the bundle of {man.get('setting')!r}, not of {setting_name!r}")
    own = root_hash(man)
    if own != man.get("root_hash"):
        raise BundleError(f"{path}: its manifest does not hash to the root hash it states (edited after export); "
                          f"refused")
    if own != expected_root:
        raise BundleError(f"{path} has root hash {own[:16]}…, not the pinned {expected_root[:16]}… of "
                          f"{setting_name}: it holds other results than the ones this package vouches for; refused")
    members = man.get("members")
    if not isinstance(members, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("bytes"), int)
            for m in members.values()):
        raise BundleError(f"{path}: its manifest's member list is malformed; refused")
    for name in members:
        check_member_name(name, setting_name)
    for rel in man.get("artifacts") or {}:
        check_member_name(f"{rel}/manifest.json", setting_name)
        if f"{rel}/manifest.json" not in members:
            raise BundleError(f"{path}: artifact {rel} has no manifest.json among the members; refused")
    return man


# ---------------------------------------------------------------- the pins that travel with the package

def read_pins(path: Path | None = None) -> dict:
    path = Path(path or PINS)
    if not path.is_file():
        return {"format": FORMAT, "bundles": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); restore it from version control") from None
    if data.get("format") != FORMAT:
        raise BundleError(f"{path} has format {data.get('format')}, this code reads {FORMAT}")
    return data


def pinned(setting_name: str, path: Path | None = None) -> str | None:
    """The root hash this package pins for ``setting_name``'s bundle, or None."""
    entry = read_pins(path)["bundles"].get(setting_name)
    return None if entry is None else entry["root_hash"]


def pin(manifest: dict, bundle_file: Path, path: Path | None = None) -> None:
    """Record ``manifest``'s root hash as the pinned bundle of its setting (other settings' pins are kept)."""
    path = Path(path or PINS)
    data = read_pins(path)
    if (data["bundles"].get(manifest["setting"]) or {}).get("root_hash") == manifest["root_hash"]:
        return  # the same bundle: the pin (and its date) stays byte-identical
    data["bundles"][manifest["setting"]] = {
        "root_hash": manifest["root_hash"], "file": Path(bundle_file).name,
        "bytes": Path(bundle_file).stat().st_size, "members": len(manifest["members"]),
        "artifacts": {rel: a["root_hash"] for rel, a in manifest["artifacts"].items()},
        "pinned": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    data["bundles"] = dict(sorted(data["bundles"].items()))
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


# ---------------------------------------------------------------- helpers for unpacking into place

def same_file(path: Path, entry: dict) -> bool:
    """Whether ``path`` already holds the member ``entry`` describes."""
    path = Path(path)
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C back while a few renames put verified files in place, then raise it: a fetch is all or nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
