"""Ground floor: the artifact format. Atomic writes, checksums, manifests that verify themselves.

An artifact is a folder with ``manifest.json`` and plain files (``.npy``/``.npz`` arrays, ``.safetensors``
checkpoints). The manifest lists every file with its sha256; :func:`verify` re-hashes them and reports
precisely which file is wrong and what to do about it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .data import atomic_write_bytes, sha256_file
from .plugins import REPO_ROOT

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, incomplete, or was built by a different recipe."""


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
    """The git commit of the code (with '+dirty' for uncommitted changes), or 'unknown'."""
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
