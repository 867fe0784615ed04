"""Sharing results: a setting's bundle (export -> fetch, deterministic, refusing anything but the pinned bytes) and
the ground truth as a Hugging Face dataset that gives the same LDS as the artifact itself."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import require_real_data, synthetic_store

from benchmark.evaluate import records, share
from benchmark.evaluate.engine import RANDOM
from benchmark.groundtruth import zoo
from benchmark.groundtruth.artifact import GroundTruth
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.setup import bundle, settings
from benchmark.setup.artifacts import sha256_file
from benchmark.setup.store import ResultsStore

SETTING = "synthetic-mlp"
COMMITTED = {"mnist-lr", "mnist-mlp-small", "mnist-cnn", "fmnist-cnn"}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A results folder with a ground truth, a mislabel artifact, a one-model zoo and a run record, and its bundle
    exported and pinned in a pins file of the test's own."""
    base = tmp_path_factory.mktemp("share")
    store = synthetic_store(base)
    setting = settings.get(SETTING)
    zoo.build(setting, zoo.ZooSpec(models=1), store=store, executor=LocalExecutor(1), device="cpu", progress=False,
              log=_quiet)
    records.run(store, setting, RANDOM, device="cpu", log=_quiet)
    pins = base / "bundles.json"
    path, man = share.export(store, setting, base / "dist", pin=True, pins_path=pins, progress=False, log=_quiet)
    return SimpleNamespace(store=store, setting=setting, path=path, man=man, pins=pins, base=base)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


def test_export_then_fetch_into_an_empty_root_gives_identical_artifacts_that_verify(source, tmp_path):
    man = source.man
    assert {rel.split("/")[0] for rel in man["artifacts"]} == {"gt", "models", "mislabel"}
    assert any(n.startswith(f"runs/{SETTING}/") for n in man["members"])
    assert bundle.pinned(SETTING, source.pins) == man["root_hash"]
    target = ResultsStore(tmp_path / "fresh")
    summary = share.fetch(target, source.setting, str(source.path), pins_path=source.pins, progress=False, log=_quiet)
    # Every member arrives byte for byte, and nothing else (no staging folder, no download) is left behind.
    assert _files(target.root) == set(man["members"]) | {"index.json"}
    for name in man["members"]:
        assert (target.root / name).read_bytes() == (source.store.root / name).read_bytes(), name
    pins = json.loads(target.index.read_text())["artifacts"]
    src_pins = json.loads(source.store.index.read_text())["artifacts"]
    assert {rel: e["root_hash"] for rel, e in pins.items()} == {rel: src_pins[rel]["root_hash"] for rel in
                                                                man["artifacts"]}
    gt_rel = next(rel for rel in man["artifacts"] if rel.startswith("gt/"))
    assert GroundTruth.open(target.root / gt_rel, source.setting, store=target).pinned
    assert records.read_record(target, SETTING, RANDOM.name)["content_sha256"]
    assert sorted(summary["pinned"]) == sorted(man["artifacts"])
    # Fetching again moves nothing and keeps everything.
    again = share.fetch(target, source.setting, str(source.path), pins_path=source.pins, progress=False, log=_quiet)
    assert again["moved"] == [] and again["pinned"] == [] and len(again["kept"]) == len(summary["moved"])


def test_fetch_merges_the_pins_of_the_target_and_never_replaces_what_is_there(source, tmp_path):
    target = ResultsStore(tmp_path / "used")
    target.root.mkdir()
    other = {"kind": "ground truth", "root_hash": "a" * 64, "pinned": "2026-01-01T00:00:00+00:00"}
    target.index.write_text(json.dumps({"format": 1, "artifacts": {"gt/other/v1": other}}))
    share.fetch(target, source.setting, str(source.path), pins_path=source.pins, progress=False, log=_quiet)
    pins = json.loads(target.index.read_text())["artifacts"]
    assert pins["gt/other/v1"] == other and set(source.man["artifacts"]) < set(pins)
    # A run record of the target that differs from the bundle's is never overwritten: the fetch is refused whole.
    record = next(n for n in source.man["members"] if n.startswith("runs/"))
    (target.root / record).write_text('{"mine": true}\n')
    shutil.rmtree(target.root / next(iter(source.man["artifacts"])))
    before = {n: (target.root / n).read_bytes() for n in _files(target.root)}
    with pytest.raises(bundle.BundleError, match="already there and differs"):
        share.fetch(target, source.setting, str(source.path), pins_path=source.pins, progress=False, log=_quiet)
    assert {n: (target.root / n).read_bytes() for n in _files(target.root)} == before


def test_export_is_deterministic(source, tmp_path):
    # Another export, after every source file got a new modification time, writes the same bytes.
    for name in source.man["members"]:
        os.utime(source.store.root / name, (1_000_000_000, 1_000_000_000))
    path, man = share.export(source.store, source.setting, tmp_path, progress=False, log=_quiet)
    assert man["root_hash"] == source.man["root_hash"] and path.name == source.path.name
    assert path.read_bytes() == source.path.read_bytes()
    with tarfile.open(path, "r:gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [bundle.MANIFEST_NAME, *sorted(source.man["members"])]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar.getmembers()]


def _write(path: Path, members: list[tuple[str, bytes]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def _tampered(source, tmp_path):
    members = _members(source.path)
    i = next(k for k, (n, _) in enumerate(members) if n.endswith("queries.npy"))
    data = bytearray(members[i][1])
    data[-1] ^= 1  # same size, one bit off
    members[i] = (members[i][0], bytes(data))
    return _write(tmp_path / "tampered.tar.gz", members), source.man["root_hash"]


def _truncated(source, tmp_path):
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(source.path.read_bytes()[: source.path.stat().st_size // 2])
    return path, source.man["root_hash"]


def _traversal_listed(source, tmp_path):
    """A bundle whose own manifest lists ../x, with a root hash that matches it (as an attacker would make)."""
    members = _members(source.path)
    man = json.loads(members[0][1])
    payload = b"escaped\n"
    man["members"]["../x"] = {"sha256": hashlib.sha256(payload).hexdigest(),
                              "bytes": len(payload)}
    man["root_hash"] = bundle.root_hash(man)
    path = _write(tmp_path / "listed.tar.gz", [(bundle.MANIFEST_NAME, json.dumps(man).encode()), ("../x", payload),
                                               *members[1:]])
    return path, man["root_hash"]


def _traversal_unlisted(source, tmp_path):
    members = _members(source.path)
    return _write(tmp_path / "unlisted.tar.gz", [members[0], ("../x", b"escaped\n"), *members[1:]]), \
        source.man["root_hash"]


def _wrong_root(source, tmp_path):
    return source.path, "0" * 64


@pytest.mark.parametrize("make,message", [
    (_tampered, "does not match its sha256"),
    (_wrong_root, "not the pinned"),
    (_truncated, "truncated or damaged"),
    (_traversal_listed, "path traversal"),
    (_traversal_unlisted, "path traversal"),
])
def test_a_bad_bundle_is_refused_with_one_line_and_nothing_written(source, tmp_path, make, message):
    path, root = make(source, tmp_path)
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"format": 1, "bundles": {SETTING: {"root_hash": root}}}))
    target = ResultsStore(tmp_path / "results")
    with pytest.raises(bundle.BundleError, match=message) as err:
        share.fetch(target, source.setting, str(path), pins_path=pins, progress=False, log=_quiet)
    assert "\n" not in str(err.value)
    assert not target.root.exists() and not (tmp_path / "x").exists()


def test_an_interrupted_fetch_leaves_nothing_behind(source, tmp_path, monkeypatch):
    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(share, "verify_records", interrupt)  # Ctrl-C after unpacking, before anything moved
    target = ResultsStore(tmp_path / "results")
    with pytest.raises(KeyboardInterrupt):
        share.fetch(target, source.setting, str(source.path), pins_path=source.pins, progress=False, log=_quiet)
    assert not target.root.exists()


def test_the_command_line_prints_a_refusal_as_one_line(source, tmp_path, capsys):
    from benchmark.cli import main

    code = main(["--results", str(tmp_path / "r"), "fetch", SETTING, "--from", str(source.path),
                 "--root-hash", "1" * 64, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not the pinned" in err
    assert main(["--results", str(tmp_path / "r"), "fetch", SETTING, "--from", str(source.path), "--quiet"]) == 2
    assert "pins no bundle of 'synthetic-mlp'" in capsys.readouterr().err  # the package pins none for it


def test_a_url_goes_through_urllib_and_is_refused_offline(source, tmp_path, monkeypatch):
    url = source.path.resolve().as_uri()  # file://: the download path of http(s), without a network
    monkeypatch.setenv("TDABENCH_OFFLINE", "1")
    with pytest.raises(bundle.BundleError, match="TDABENCH_OFFLINE is set"):
        share.fetch(ResultsStore(tmp_path / "off"), source.setting, url, pins_path=source.pins, progress=False)
    assert not (tmp_path / "off").exists()
    monkeypatch.setenv("TDABENCH_OFFLINE", "0")
    summary = share.fetch(ResultsStore(tmp_path / "on"), source.setting, url, pins_path=source.pins, progress=False,
                          log=_quiet)
    assert len(summary["moved"]) and summary["root_hash"] == source.man["root_hash"]


def test_the_wheel_carries_the_pins():
    import tomllib

    from benchmark.setup.store import REPO_ROOT

    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert bundle.PINS.parent == REPO_ROOT / "benchmark" / "setup" and bundle.PINS.name in data["benchmark.setup"]


def test_the_package_pins_the_bundles_of_the_committed_results():
    """The pins that travel with the package are the bundles the committed results give (re-pin with
    `tdabench export SETTING --pin` after a reviewed change to a setting's artifacts or run records)."""
    pins = bundle.read_pins()["bundles"]
    assert set(pins) == COMMITTED
    store = ResultsStore.default()
    for name, entry in sorted(pins.items()):
        man = share.manifest(store, settings.get(name), verify=False, log=_quiet)
        assert man["root_hash"] == entry["root_hash"], (
            f"{name}: the committed results give bundle {man['root_hash'][:16]}…, the package pins "
            f"{entry['root_hash'][:16]}…; run `tdabench export {name} --pin` after reviewing the change")


# ---------------------------------------------------------------- the ground truth as a Hugging Face dataset

def test_the_hugging_face_dataset_gives_the_same_lds_as_the_ground_truth(tmp_path):
    datasets = pytest.importorskip("datasets")
    from benchmark import core
    from benchmark.evaluate import engine, metrics, registry
    from benchmark.evaluate.cost import Cost
    from benchmark.groundtruth import artifact, hf

    setting = settings.get("mnist-lr")
    gt = artifact.load(ResultsStore.default(), setting)
    folder = hf.export(gt, tmp_path, progress=False)

    dd = datasets.load_from_disk(str(folder))
    p = gt.protocol
    s, m = dd["subsets"].with_format("numpy")[:], dd["measurements"].with_format("numpy")[:]
    masks = np.stack(s["mask"])[np.argsort(s["subset"])]
    order = np.lexsort((m["subset"], m["replica"]))
    target = np.stack(m["queries_margin"])[order].reshape(p.seeds, p.subsets, -1).mean(axis=0)
    validation = np.stack(m["validation_margin"])[order].reshape(p.seeds, p.subsets, -1).mean(axis=0)
    qt = dd["queries"].with_format("numpy")[:]
    reported = qt["split"] == "queries"
    queries = qt["test_index"][reported][np.argsort(qt["position"][reported])]
    assert masks.dtype == bool and np.array_equal(masks, gt.masks) and np.array_equal(queries, gt.queries)
    assert np.array_equal(target, gt.target()) and np.array_equal(validation, gt.target(split="validation"))

    # The same table through load_dataset("parquet"), as a user of the files alone reads it.
    pq = datasets.load_dataset("parquet", data_files=str(folder / "data" / "measurements.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache")).with_format("numpy")[:]
    order = np.lexsort((pq["subset"], pq["replica"]))
    assert np.array_equal(np.stack(pq["queries_margin"])[order].reshape(p.seeds, p.subsets, -1).mean(axis=0), target)

    # A row's scores (the identity solver on the ground truth's first full-data model): the same LDS, exactly.
    data = require_real_data(setting)
    cpu = torch.device("cpu")
    fitted = engine.fit(registry.get("identity"), {}, [gt.full_model(0)], data.train_x, data.train_y,
                        data.num_classes, "margin", cpu, Cost(cpu), "fit", core.CurvatureCache())
    q = torch.from_numpy(gt.queries)
    scores = fitted[0].scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y)
    ours = metrics.lds(scores, masks, target)
    theirs = metrics.lds(scores, gt.masks, gt.target())
    assert np.array_equal(ours.pop("per_query"), theirs.pop("per_query"), equal_nan=True)
    assert ours == theirs and 0.1 < theirs["mean"] < 1

    card = (folder / "README.md").read_text()
    assert gt.root_hash() in card and "license: cc-by-sa-3.0" in card and "cff-version" in card
    for t in hf.TABLES:
        assert sha256_file(folder / "data" / f"{t}.parquet") in card


def test_pinning_the_same_bundle_again_leaves_the_pin_file_byte_identical(tmp_path, monkeypatch):
    """A re-export of unchanged results re-pins nothing: the pin file (committed) keeps its bytes and its date."""
    import datetime as dt

    from benchmark.setup import bundle

    member = tmp_path / "b.tar.gz"
    member.write_bytes(b"x")
    manifest = {"setting": "s", "root_hash": "a" * 64, "members": {}, "artifacts": {}}
    pins = tmp_path / "pins.json"
    bundle.pin(manifest, member, pins)
    first = pins.read_bytes()

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2030, 1, 1, tzinfo=tz)

    monkeypatch.setattr(bundle._dt, "datetime", Later)
    bundle.pin(manifest, member, pins)
    assert pins.read_bytes() == first
    bundle.pin({**manifest, "root_hash": "b" * 64}, member, pins)  # another bundle: a new pin, with its date
    assert bundle.pinned("s", pins) == "b" * 64 and b"2030-01-01" in pins.read_bytes()
