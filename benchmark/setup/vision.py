"""Floor 2: natural-image settings: Hugging Face datasets cached as uint8 tensors, and timm models.

Data. A :class:`HubImageDataset` names an image-classification dataset on the Hugging Face hub. Images are
resized and centre-cropped once (:class:`ImageTransform`) and kept as raw uint8 pixels, N x 3 x H x W (a
quarter of float32: Food101 at 224 px is 15 GB instead of 61 GB); the model's first layer
(:class:`ImageNormalize`) scales and normalises them. :func:`load_hub_images` looks, in order, in

1. the prepared cache ``<cache>/<name>/prepared-<key>/`` (``<cache>`` as in :mod:`benchmark.data`:
   ``$TDABENCH_DATA``, else the XDG cache), whose ``meta.json`` holds each array's sha256;
2. a local copy of the dataset saved with ``DatasetDict.save_to_disk`` in ``<cache>/<name>/hf/``;
3. the hub, through ``datasets.load_dataset`` (which reuses the Hugging Face cache under ``$HF_HOME``).
   Skipped when ``TDABENCH_OFFLINE`` is 1/true/yes/on (unless ``HF_HUB_OFFLINE=1`` says to read the HF cache
   offline), and after a 5-second probe when the endpoint cannot be reached: never a long hang.

Models. :class:`TimmModel` builds a timm model (timm is imported only then, so settings register and list
without it), optionally from pretrained weights found in ``<cache>/weights/<tag>.safetensors``, in the
Hugging Face cache, or on the hub (same offline rules). Nothing falls back silently: a setting that fine-tunes
pretrained weights fails with an error saying where the weights were looked for and how to provide them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import stable_hash
from .artifacts import atomic_write_bytes, sha256_file
from .data import DataError, ImageData, cache_dir, offline_mode
from .deps import require

PREPARED_FORMAT = 1  # bump when the prepared arrays change meaning (layout, transform semantics)
PROBE_TIMEOUT_S = 5.0
FULL_HASH_LIMIT = 1 << 30  # arrays above 1 GiB are checked by size and sampled blocks on every load
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- where things come from

def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def tdabench_offline() -> bool:
    return offline_mode()  # 0/false/no/off mean online, as for the IDX datasets


def hf_offline() -> bool:
    """The user asked the Hugging Face libraries to use their cache only."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hf_hub_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment now (the library reads it once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return require("huggingface_hub.constants", "the Hugging Face cache").HF_HUB_CACHE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub endpoint opens within ``timeout``, else why not."""
    url = urllib.parse.urlparse(endpoint or hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _hub_allowed(log: list[str], what: str) -> bool:
    """Whether to ask the hub (or the HF libraries' offline cache) for ``what``; logs why not."""
    if hf_offline():
        return True  # the HF libraries read their own cache and make no request
    if tdabench_offline():
        log.append(f"hub: skipped for {what} (TDABENCH_OFFLINE is set; set HF_HUB_OFFLINE=1 as well to read "
                   f"a Hugging Face cache without the network)")
        return False
    why = probe_hub()
    if why is not None:
        log.append(f"hub {hub_endpoint()}: unreachable for {what} ({why})")
        return False
    return True


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class HubImageDataset:
    """An image-classification dataset on the Hugging Face hub and the split the benchmark uses."""

    name: str  # cache folder and DataSpec name
    repo: str  # Hugging Face dataset id
    train_splits: tuple[str, ...]  # concatenated in this order into the training set
    test_split: str
    num_classes: int
    train_size: int  # expected sizes: a dataset that differs is an error, never a silent change
    test_size: int
    revision: str | None = None  # a commit pins the data; None follows the repo's main branch
    image_column: str = "image"
    label_column: str = "label"

    def record(self) -> dict:
        return {"source": "huggingface", **asdict(self)}


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resize`` pixels, centre-crop ``crop`` x ``crop``, RGB; the network input is
    then ``(pixel / 255 - mean) / std`` (done by :class:`ImageNormalize` inside the model)."""

    resize: int
    crop: int
    interpolation: str = "bilinear"  # PIL resampling filter
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.resize}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic", "lanczos"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    def record(self) -> dict:
        return asdict(self)

    def apply(self, image) -> np.ndarray:
        """A PIL image -> uint8 array (3, crop, crop)."""
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        image = image.resize(size, resample=getattr(Image.Resampling, self.interpolation.upper()))
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def prepared_dir(ds: HubImageDataset, tf: ImageTransform) -> Path:
    key = stable_hash({"format": PREPARED_FORMAT, "data": ds.record(), "resize": tf.resize, "crop": tf.crop,
                       "interpolation": tf.interpolation}, 12)
    return cache_dir() / ds.name / f"prepared-{key}"


ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _sampled_digest(path: Path, blocks: int = 64, block: int = 1 << 20) -> str:
    """sha256 of the file size and ``blocks`` evenly spaced 1 MiB blocks: catches truncation and most damage
    to a large array without reading all of it on every load."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, (size - block) * i // max(1, blocks - 1)))
            h.update(f.read(block))
    return h.hexdigest()


def _read_prepared(folder: Path, log: list[str]) -> dict | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        log.append(f"prepared cache {folder}: not there")
        return None
    try:
        meta = json.loads(meta_path.read_text())
        for name in ARRAYS:
            path, want = folder / f"{name}.npy", meta["files"][f"{name}.npy"]
            if not path.is_file() or path.stat().st_size != want["bytes"]:
                raise DataError(f"{path.name} is missing or has the wrong size")
            got = sha256_file(path) if want["bytes"] <= FULL_HASH_LIMIT else _sampled_digest(path)
            if got != (want["sha256"] if want["bytes"] <= FULL_HASH_LIMIT else want["sampled_sha256"]):
                raise DataError(f"{path.name} fails its checksum (corrupt or modified)")
    except (DataError, OSError, KeyError, json.JSONDecodeError) as exc:
        log.append(f"prepared cache {folder}: unusable ({exc}); it will be rebuilt")
        return None
    with warnings.catch_warnings():  # read-only memory maps: the harness only ever reads its data
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        arrays = {n: torch.from_numpy(np.load(folder / f"{n}.npy", mmap_mode="r")) for n in ARRAYS}
    return {**arrays, "class_names": tuple(meta.get("class_names", ()))}


def _open_source(ds: HubImageDataset, log: list[str]) -> dict:
    """The dataset's splits as ``datasets.Dataset`` objects, from a local copy or the hub."""
    hf = require("datasets", f"the {ds.name} dataset")
    splits = (*ds.train_splits, ds.test_split)
    local = cache_dir() / ds.name / "hf"
    found = None
    if local.is_dir():
        try:
            found = hf.load_from_disk(str(local))
        except Exception as exc:  # noqa: BLE001 - any failure means "this copy is not usable"
            log.append(f"local copy {local}: unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    else:
        log.append(f"local copy {local}: not there")
    if found is None and _hub_allowed(log, f"dataset {ds.repo}"):
        try:
            found = hf.load_dataset(ds.repo, revision=ds.revision)
        except Exception as exc:  # noqa: BLE001 - hub and cache errors vary; all mean "not obtainable here"
            log.append(f"hub dataset {ds.repo}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if found is None:
        return {}
    missing = [s for s in splits if s not in found]
    if missing:
        raise DataError(f"{ds.name}: the dataset has splits {sorted(found)}, not {missing}; the setting expects "
                        f"{list(ds.train_splits)} for training and {ds.test_split!r} for testing")
    return {s: found[s] for s in splits}


def _prepare_split(parts: list, ds: HubImageDataset, tf: ImageTransform, folder: Path, prefix: str,
                   threads: int) -> int:
    """Transform the images of ``parts`` (concatenated) into ``<prefix>_x.npy`` / ``<prefix>_y.npy``."""
    n = sum(len(p) for p in parts)
    for p in parts:
        for col in (ds.image_column, ds.label_column):
            if col not in p.column_names:
                raise DataError(f"{ds.name}: no column {col!r} in the dataset (columns: {p.column_names})")
    labels = np.concatenate([np.asarray(p[ds.label_column], dtype=np.int64) for p in parts])
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= ds.num_classes:
        raise DataError(f"{ds.name}: labels outside 0..{ds.num_classes - 1} ({labels.min()}..{labels.max()})")
    tmp_x = folder / f".{prefix}_x.npy.tmp"
    images = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.uint8, shape=(n, 3, tf.crop, tf.crop))
    chunks, offset = [], 0
    for p in parts:
        for start in range(0, len(p), 256):
            chunks.append((p, start, min(start + 256, len(p)), offset + start))
        offset += len(p)

    def work(chunk, images=images):  # PIL decodes and resizes without the GIL, so threads scale
        p, start, stop, at = chunk
        for i, image in enumerate(p[start:stop][ds.image_column]):
            images[at + i] = tf.apply(image)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, chunks))
    images.flush()
    del images
    os.replace(tmp_x, folder / f"{prefix}_x.npy")
    np.save(folder / f"{prefix}_y.npy", labels, allow_pickle=False)
    return n


def load_hub_images(ds: HubImageDataset, tf: ImageTransform, threads: int | None = None) -> ImageData:
    """The dataset as uint8 images (N, 3, crop, crop) and int64 labels; prepared once, then memory-mapped."""
    folder = prepared_dir(ds, tf)
    log: list[str] = []
    arrays = _read_prepared(folder, log)
    if arrays is None:
        source = _open_source(ds, log)
        if not source:
            raise DataError(_data_error(ds, log))
        threads = threads or min(16, os.cpu_count() or 1)
        tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")  # per process: preparers may race
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _prepare_split([source[s] for s in ds.train_splits], ds, tf, tmp, "train", threads)
        _prepare_split([source[ds.test_split]], ds, tf, tmp, "test", threads)
        feature = source[ds.test_split].features.get(ds.label_column)
        meta = {"format": PREPARED_FORMAT, "dataset": ds.record(), "transform": tf.record(),
                "class_names": list(getattr(feature, "names", None) or []),
                "pillow": __import__("PIL").__version__, "datasets": require("datasets", "").__version__,
                "files": {}}
        for name in ARRAYS:
            path = tmp / f"{name}.npy"
            meta["files"][path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path),
                                        "sampled_sha256": _sampled_digest(path)}
        atomic_write_bytes(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        shutil.rmtree(folder, ignore_errors=True)  # a damaged cache (a valid one was used above)
        try:
            os.replace(tmp, folder)  # the prepared cache appears whole or not at all
        except OSError:  # another process finished first: keep its copy (same source, same transform)
            shutil.rmtree(tmp, ignore_errors=True)
        arrays = _read_prepared(folder, log)
        if arrays is None:
            raise DataError(f"{ds.name}: the prepared cache {folder} did not verify right after writing it: "
                            + "; ".join(log[-1:]))
    sizes = (len(arrays["train_y"]), len(arrays["test_y"]))
    if sizes != (ds.train_size, ds.test_size):
        raise DataError(f"{ds.name}: got {sizes[0]} training and {sizes[1]} test images, the setting expects "
                        f"{ds.train_size} and {ds.test_size} (splits {list(ds.train_splits)} / {ds.test_split!r} of "
                        f"{ds.repo}); the source differs from the one the setting was written for")
    return ImageData(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], ds.num_classes,
                     arrays["class_names"])


def _data_error(ds: HubImageDataset, log: list[str]) -> str:
    root = cache_dir() / ds.name
    fixes = [
        f"on a machine that reaches the hub, run `tdabench data SETTING` for a setting on {ds.name}, then copy "
        f"{root} into this machine's cache (point TDABENCH_DATA at the folder that holds {ds.name}/)",
        f"or save the dataset there yourself: datasets.load_dataset({ds.repo!r}).save_to_disk({str(root / 'hf')!r})",
        "or point HF_HOME (or HF_DATASETS_CACHE) at a Hugging Face cache that holds it and set HF_HUB_OFFLINE=1",
    ]
    if tdabench_offline() and not hf_offline():
        fixes.append("or unset TDABENCH_OFFLINE to let the hub be asked")
    return (f"cannot obtain dataset {ds.name!r} (Hugging Face {ds.repo}, splits {'+'.join(ds.train_splits)} / "
            f"{ds.test_split}): no local copy, and the hub could not be asked or did not deliver it.\nTried:\n  - "
            + "\n  - ".join(log) + "\nTo fix:\n  - " + "\n  - ".join(fixes))


# ---------------------------------------------------------------- models

class ImageNormalize(nn.Module):
    """Raw pixel values 0-255 (uint8 as stored, or any float dtype) -> ``(x / 255 - mean) / std`` in the
    dtype of the model; no parameters, so curvature code sees only the network behind it."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        m, s = torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)
        self.register_buffer("shift", -m / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.scale.dtype) * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, input=pixels 0-255"


class WeightsError(DataError):
    """Pretrained weights a setting needs cannot be found or fetched."""


def pretrained_weights(tag: str) -> Path:
    """A local file holding timm's pretrained weights ``tag`` (e.g. ``resnet50.tv_in1k``).

    Looks in ``<cache>/weights/<tag>.safetensors`` (or .pth/.bin), then the Hugging Face cache, then asks
    the hub (unless offline or unreachable), which stores the file in the Hugging Face cache.
    """
    timm = require("timm", f"pretrained weights {tag}")
    hub = require("huggingface_hub", f"pretrained weights {tag}")
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"timm knows no pretrained weights {tag!r} on the Hugging Face hub")
    log: list[str] = []
    local_dir = cache_dir() / "weights"
    for ext in (".safetensors", ".pth", ".bin"):
        path = local_dir / f"{tag}{ext}"
        if path.is_file():
            return path
    log.append(f"local file {local_dir}/{tag}.safetensors (.pth, .bin): not there")
    names = ("model.safetensors", "pytorch_model.bin")
    for name in names:
        hit = hub.try_to_load_from_cache(cfg.hf_hub_id, name, cache_dir=hf_hub_cache())
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    log.append(f"Hugging Face cache {hf_hub_cache()}: no {cfg.hf_hub_id}/{' or '.join(names)}")
    if _hub_allowed(log, f"weights {cfg.hf_hub_id}"):
        for name in names:
            try:
                return Path(hub.hf_hub_download(cfg.hf_hub_id, name, cache_dir=hf_hub_cache()))
            except Exception as exc:  # noqa: BLE001 - try the other file name, then report
                log.append(f"hub {cfg.hf_hub_id}/{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise WeightsError(
        f"cannot load pretrained weights {tag!r} (Hugging Face {cfg.hf_hub_id}): no local copy, and the hub could "
        f"not be asked or did not deliver them.\nTried:\n  - " + "\n  - ".join(log)
        + f"\nTo fix:\n  - put the weights file at {local_dir}/{tag}.safetensors (from "
        f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors; TDABENCH_DATA moves {local_dir.parent})"
        "\n  - or point HF_HOME (or HF_HUB_CACHE) at a Hugging Face cache holding them"
        + ("\n  - or unset TDABENCH_OFFLINE to let the hub be asked" if tdabench_offline() and not hf_offline() else ""))


@dataclass(frozen=True)
class TimmModel:
    """A setting's model builder: ``timm.create_model(arch, num_classes=..., **options)``.

    ``pretrained``: a timm weights tag to fine-tune from (the classifier head is new and seeded); None means
    random initialisation. ``normalize`` = (mean, std) puts :class:`ImageNormalize` in front, for data stored
    as raw pixels. ``fused_attn=False`` computes attention as softmax(QKᵀ/√d)V in plain operations instead of
    the fused kernel, which has no forward-mode derivative and no vmap rule: curvature-vector products (CG,
    LiSSA) and batched per-example gradients need both.
    """

    arch: str
    num_classes: int
    pretrained: str | None = None
    normalize: tuple | None = None
    options: dict = field(default_factory=dict)
    fused_attn: bool = False

    def __post_init__(self):
        if self.pretrained and self.pretrained.split(".")[0] != self.arch:
            raise ValueError(f"pretrained weights {self.pretrained!r} are not for architecture {self.arch!r}")

    def record(self) -> dict:
        return asdict(self)

    def __call__(self) -> nn.Module:
        timm = require("timm", f"the {self.arch} model")
        if self.pretrained:
            path = pretrained_weights(self.pretrained)
            model = timm.create_model(self.pretrained, pretrained=True, num_classes=self.num_classes,
                                      pretrained_cfg_overlay={"file": str(path)}, **self.options)
        else:
            model = timm.create_model(self.arch, pretrained=False, num_classes=self.num_classes, **self.options)
        for module in model.modules():  # timm's attention blocks choose their kernel by this attribute
            if hasattr(module, "fused_attn"):
                module.fused_attn = self.fused_attn
        if self.normalize is None:
            return model
        return nn.Sequential(ImageNormalize(*self.normalize), model)
