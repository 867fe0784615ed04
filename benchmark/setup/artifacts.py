"""Floor 2: the artifact format. Atomic writes, checksums, manifests that verify themselves.

An artifact is a folder with ``manifest.json`` and plain files (``.npy``/``.npz`` arrays, ``.safetensors``
checkpoints). The manifest lists every file with its sha256; :func:`verify` re-hashes them and reports
precisely which file is wrong and what to do about it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .store import IN_CLONE, REPO_ROOT

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, incomplete, or was built by a different recipe."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the file is corrupt") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def version_folders(folder: Path) -> list[Path]:
    """The ``v1``, ``v2``, … folders of an artifact family, in version order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def file_hashes(root: Path, names) -> dict[str, str]:
    return {n: sha256_file(root / n) for n in sorted(names)}


def verify_files(root: Path, files: dict[str, str], regenerate_hint: str) -> None:
    """Check that every listed file exists with the listed sha256; raise naming the first bad ones."""
    problems = []
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch for {path} (corrupt or modified)")
    if problems:
        shown = "\n  - ".join(problems[:10]) + (f"\n  - ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ArtifactError(f"artifact {root} failed verification:\n  - {shown}\nTo fix: {regenerate_hint}")


def code_version() -> str:
    """The git commit of the code (with '+dirty' for uncommitted changes); an installed package's version outside a
    clone; else 'unknown'."""
    if not IN_CLONE:
        from importlib import metadata

        try:
            return f"tdabench {metadata.version('tdabench')} (installed package)"
        except metadata.PackageNotFoundError:
            return "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "benchmark", "datasets"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str | None = None, **extra) -> dict:
    import platform

    import numpy
    import scipy

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            env["device"] = f"cpu ({os.cpu_count()} cores)"
        elif torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(device)
        else:  # e.g. the head node of a cluster whose GPUs are on the workers: the units record their own GPU
            env["device"] = "cuda (not visible to this process)"
    env.update(extra)
    return env


def temp_dir_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))


class ArtifactLock:
    """An exclusive lock on an artifact folder while it is being built (``<folder>/.lock``, flock).

    Two builds of the same artifact at once would train every unit twice and race on the manifest; the
    second one fails at once with a message naming the holder instead. The lock dies with its process, so a
    killed build never leaves a stale lock behind.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self._fd = None

    def __enter__(self) -> "ArtifactLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArtifactError(f"{self.path.parent} is being built by {holder}; wait for it to finish (or stop it) "
                                f"and run the command again: it resumes where that build stopped") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete half-written ``.*.tmp`` files a killed writer left in an artifact folder (call under its lock)."""
    found = [p for p in Path(root).rglob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink()
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def hardware(device: torch.device | str = "cpu") -> dict:
    """What a model was trained on, to the detail that changes its float round-off: the device, the CPU model
    and the vector instructions torch dispatches to, the GPU, the library versions and the thread count."""
    device = torch.device(device)
    out = {"device": device.type, "cpu": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda" and torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def hardware_key(hw: dict) -> str:
    """The fields of :func:`hardware` that decide bitwise reproducibility (threads and versions included)."""
    keys = ("device", "cpu", "torch_cpu_capability", "cuda_device", "torch", "torch_threads")
    return "; ".join(f"{k}={hw[k]}" for k in keys if hw.get(k) is not None)
