"""The ground-truth harness: resumable, extendable, self-verifying artifacts."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmark import groundtruth as G
from benchmark.groundtruth import builder as B
from benchmark.groundtruth import index
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, ArtifactError, ArtifactLock, read_json, write_json
from benchmark.setup.config import Protocol, Unit, unit_seed
from benchmark.setup.store import ResultsStore

SETTING = "synthetic-mlp"
S = settings.get(SETTING)
quiet = dict(progress=False, log=lambda *_: None)


def _build(root, **kw):
    """Build into the results store at ``root``; the trainer is pinned ("auto" times both, and loop and vmap agree
    only to float round-off)."""
    kw.setdefault("trainer", "loop")
    return G.build(kw.pop("setting", S), kw.pop("protocol", None), store=ResultsStore(root),
                   executor=kw.pop("executor", LocalExecutor(1)), **quiet, **kw)


def _load(root, **kw):
    return G.load(ResultsStore(root), kw.pop("setting", S), **kw)


def _content(path):
    """Everything in an artifact except timings and the hardware record: masks, queries, unit outputs, checkpoints."""
    out = {}
    for f in sorted(path.rglob("*")):
        rel = str(f.relative_to(path))
        if f.suffix == ".npy":
            out[rel] = np.load(f)
        elif f.suffix == ".npz":
            with np.load(f) as z:
                out.update({f"{rel}:{k}": z[k] for k in z.files if k not in ("seconds", "hardware")})
        elif f.suffix == ".safetensors":
            from safetensors.numpy import load_file

            out.update({f"{rel}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test (and every ground-truth worker) trains: the hardware record matches
    try:
        return _build(root)
    finally:
        torch.set_num_threads(before)


def test_complete_artifact_loads_and_verifies(reference):
    gt = G.GroundTruth.open(reference, S)
    p = settings.get(SETTING).protocols["default"]
    assert gt.manifest["complete"] and gt.manifest["units_done"] == gt.manifest["units_total"] == p.subsets * p.seeds + p.full_models
    assert gt.masks.shape == (p.subsets, 256) and (gt.masks.sum(1) == 128).all()
    assert len(set(gt.queries) & set(gt.validation_queries)) == 0
    assert gt.target("margin").shape == (p.subsets, p.queries)
    assert gt.target("margin", split="validation").shape == (p.subsets, p.validation_queries)
    assert np.isfinite(gt.outputs["margin"]).all()
    nc = gt.manifest["noise_ceiling"]["margin"]
    assert -1 <= nc["pairwise_single_seed"] <= 1 and 0 <= nc["lds_ceiling"] <= 1
    for key in ("setting", "version", "protocol", "recipe", "recipe_hash", "data", "environment", "files",
                "noise_ceiling", "created", "code_version"):
        assert key in gt.manifest
    model = gt.full_model(0)
    assert isinstance(model, torch.nn.Module)
    summary = G.verify(ResultsStore(reference.parents[2]), S)
    assert summary["complete"] and summary["files_verified"] == len(gt.manifest["files"])
    assert summary["pinned"] and summary["root_hash"] == index.pinned(ResultsStore(reference.parents[2]), reference)
    # every unit records the hardware that trained it; one machine built this one
    assert summary["hardware"] == {next(iter(gt.hardware_groups())): len(G.all_units(gt.protocol))}
    assert not summary["mixed_hardware"]


def test_units_match_their_seed_and_subset(reference):
    """A unit's stored outputs are those of a model retrained from its recorded seed and subset."""
    from benchmark.setup.training import evaluate, train

    s = S
    gt = G.GroundTruth.open(reference, s)
    d = s.data()
    unit = Unit(1, 3)
    seed = unit_seed(gt.protocol, unit)
    idx = torch.from_numpy(np.flatnonzero(gt.masks[3]))
    model = train(s.model(seed), d.train_x, d.train_y, s.recipe, seed, idx)
    q = torch.from_numpy(np.concatenate([gt.queries, gt.validation_queries]))
    ev = evaluate(model, d.test_x[q], d.test_y[q])
    assert np.allclose(gt.outputs["margin"][1, 3], ev["margin"].numpy(), atol=1e-5)


def test_interrupted_build_resumes_to_identical_artifact(tmp_path, reference):
    class Interrupting(LocalExecutor):
        def run(self, fn, jobs):
            for i, result in enumerate(super().run(fn, jobs)):
                if i == 7:
                    raise KeyboardInterrupt
                yield result

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, executor=Interrupting(1))
    path = tmp_path / "gt" / SETTING / "v1"
    man = json.loads((path / "manifest.json").read_text())
    assert not man["complete"] and man["units_done"] == 8  # the 8th unit was written before the interrupt
    with pytest.raises(ArtifactError, match="incomplete"):
        _load(tmp_path)
    # A crash mid-write (SIGKILL) leaves a temp file or an unreadable unit: the next start removes the temp file
    # (it would otherwise be committed with `git add results`) and redoes the unit.
    (path / "units" / "r01_s0000.npz").write_bytes(b"half a zip")
    (path / "units" / ".r01_s0001.npz.123.tmp").write_bytes(b"junk")
    seen = []
    again = G.build(S, store=ResultsStore(tmp_path), executor=LocalExecutor(1), trainer="loop", max_units=3,
                    progress=False, log=seen.append)
    assert not (path / "units" / ".r01_s0001.npz.123.tmp").exists()
    assert any("half-written" in line for line in seen)
    assert json.loads((again / "manifest.json").read_text())["units_done"] == 11
    assert _build(tmp_path) == path
    _assert_same(_content(path), _content(reference))


def test_incomplete_study_names_the_command_that_resumes_it(tmp_path, monkeypatch):
    """Plain `tdabench gt SETTING` would start the default protocol's artifact: the hint must carry the study's
    protocol and --study, and that command must plan the same unfinished version."""
    import shlex

    from benchmark import cli

    store = ResultsStore(tmp_path)
    default = S.protocols["default"]
    protocol = dataclasses.replace(default, subsets=default.subsets - 1, seed_policy="varied")
    path = G.build(S, protocol, store=store, study=True, executor=LocalExecutor(1), trainer="loop", max_units=2,
                   **quiet)
    assert path.parent.parent == store.gt_studies
    with pytest.raises(ArtifactError, match="incomplete") as err:
        G.load(store, S, study=True)
    command = str(err.value).split("`")[1]
    assert command == G.build_command(json.loads((path / "manifest.json").read_text()), path, S)
    assert "--study" in command
    asked = {}
    monkeypatch.setattr(B, "build", lambda setting, protocol, *, store, study, **kw: asked.update(
        setting=setting, protocol=protocol, store=store, study=study))
    # the real CLI, with the build it would start captured
    assert cli.main(["--results", str(tmp_path)] + shlex.split(command)[1:]) == 0
    assert asked["protocol"] == protocol and asked["store"] == store and asked["study"]
    assert B.plan_version(asked["setting"], asked["protocol"], store.gt_studies) == (path, None, False)
    # The benchmark's own artifact with the default protocol resumes with the plain command.
    assert G.build_command({"setting": SETTING, "protocol": dataclasses.asdict(default)}, tmp_path / "gt" / SETTING
                           / "v1", S) == f"tdabench gt {SETTING}"


def test_process_pool_gives_the_same_artifact(tmp_path, reference):
    path = _build(tmp_path, executor=LocalExecutor(2, 1))
    _assert_same(_content(path), _content(reference))


def test_vmap_trainer_gives_the_same_outputs(tmp_path, reference):
    path = _build(tmp_path, trainer="vmap", models_per_job=5)
    assert json.loads((path / "manifest.json").read_text())["environment"]["trainer"] == "vmap"
    got, ref = _content(path), _content(reference)
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.allclose(got[k], ref[k], rtol=1e-3, atol=1e-4), k


def test_resume_keeps_the_trainer_it_started_with(tmp_path):
    _build(tmp_path, trainer="vmap", max_units=3)
    seen = []
    G.build(S, store=ResultsStore(tmp_path), executor=LocalExecutor(1), progress=False, log=seen.append)
    assert any("(vmap," in line for line in seen), seen


def _copy(reference, tmp_path):
    """A copy of the reference artifact in a fresh store, pinned there as a finished build would pin it."""
    import shutil

    copy = tmp_path / "gt" / SETTING / "v1"
    shutil.copytree(reference, copy)
    index.pin(ResultsStore(tmp_path), copy, index.root_hash(read_json(copy / MANIFEST)), "ground truth")
    return copy


def test_damaged_artifact_is_rejected_and_the_suggested_command_repairs_it(tmp_path, reference):
    from benchmark import cli

    copy = _copy(reference, tmp_path)
    victim = copy / "units" / "r00_s0002.npz"
    blob = bytearray(victim.read_bytes())
    blob[-30] ^= 0xFF
    victim.write_bytes(bytes(blob))
    (copy / "full" / "full_k01.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"checksum mismatch for .*r00_s0002\.npz") as err:
        _load(tmp_path)
    assert "missing file" in str(err.value)
    command = str(err.value).split("`")[1]
    assert command == f"tdabench gt {SETTING}"
    trained = []

    class Counting(LocalExecutor):
        def run(self, fn, jobs):
            jobs = list(jobs)
            trained.extend(u.name for j in jobs for u in j.units)
            yield from super().run(fn, jobs)

    import shlex

    from benchmark.cli import groundtruth as cli_gt

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cli_gt, "_executor", lambda args: Counting(1))
    try:
        assert cli.main(["--results", str(tmp_path)] + shlex.split(command)[1:] + ["--trainer", "loop", "--quiet"]) == 0
    finally:
        monkeypatch.undo()
    assert sorted(trained) == ["full_k01", "r00_s0002"]  # exactly the damaged units, nothing else
    gt = _load(tmp_path)  # verifies again; the repaired files (new timings) are pinned under a new root hash
    assert gt.pinned and gt.root_hash() != G.GroundTruth.open(reference, S).root_hash()
    _assert_same(_content(copy), _content(reference))  # retrained from the recorded seeds: the same models


def test_rehashed_tampering_is_refused_by_the_pinned_root_hash(tmp_path, reference):
    """Negating every unit's margins and rewriting their sha256 in the manifest passes the file checks; the root
    hash pinned in the store's index does not."""
    from benchmark.setup.artifacts import file_hashes

    copy = _copy(reference, tmp_path)
    man = read_json(copy / MANIFEST)
    for name in [n for n in man["files"] if n.startswith("units/")]:
        with np.load(copy / name) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["outputs"][0] *= -1
        np.savez(copy / name, **arrays)
    man["files"].update(file_hashes(copy, list(man["files"])))
    write_json(copy / MANIFEST, man)
    with pytest.raises(ArtifactError, match="differs from the one pinned"):
        _load(tmp_path)


@pytest.mark.parametrize("edit", ["seeds", "subsets", "ceiling", "units_done"])
def test_a_manifest_that_does_not_describe_its_files_is_refused(tmp_path, reference, edit):
    """Protocol, unit count and recorded summaries are checked against the files on load, before any scoring,
    even when someone re-pinned the edited manifest."""
    copy = _copy(reference, tmp_path)
    man = read_json(copy / MANIFEST)
    if edit == "seeds":
        man["protocol"]["seeds"] = 1
        expect = "files the protocol has no unit for"
    elif edit == "subsets":
        man["protocol"]["subsets"] -= 1
        expect = "masks.npy holds"
    elif edit == "ceiling":
        man["noise_ceiling"]["margin"]["lds_ceiling"] += 0.05
        expect = "recorded noise_ceiling is not what the files give"
    else:
        man["units_done"] -= 1
        expect = "manifest says"
    write_json(copy / MANIFEST, man)
    if edit in ("seeds", "subsets"):  # the protocol is part of the root hash: refused at once
        with pytest.raises(ArtifactError, match="differs from the one pinned"):
            _load(tmp_path)
        index.pin(ResultsStore(tmp_path), copy, index.root_hash(man), "ground truth")
    with pytest.raises(ArtifactError, match=expect):
        _load(tmp_path)


def test_two_builds_of_one_artifact_cannot_run_at_once(tmp_path):
    _build(tmp_path, max_units=1)
    path = tmp_path / "gt" / SETTING / "v1"
    with ArtifactLock(path):  # another build holds the artifact
        with pytest.raises(ArtifactError, match="is being built by pid"):
            _build(tmp_path)
    _build(tmp_path, max_units=1)  # free again once the holder is done


def test_a_build_moved_to_other_hardware_says_so(tmp_path, monkeypatch):
    _build(tmp_path, max_units=5)
    monkeypatch.setattr(B, "hardware", lambda device: {"device": "cpu", "cpu": "Another CPU", "torch": "x"})
    path = _build(tmp_path)
    man = read_json(path / MANIFEST)
    assert len(man["hardware"]) == 2 and sorted(man["hardware"].values()) == [5, man["units_total"] - 5]
    summary = G.verify(ResultsStore(tmp_path), S)
    assert summary["mixed_hardware"] and any("Another CPU" in k for k in summary["hardware"])


def test_stale_recipe_is_rejected(reference, monkeypatch):
    s = S
    changed = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=s.recipe.epochs + 1))
    with pytest.raises(ArtifactError, match=r"stale.*differs in: train"):
        G.GroundTruth.open(reference, changed)


def test_extending_trains_only_new_units_into_a_new_version(tmp_path, reference):
    _copy(reference, tmp_path)
    base = S.protocols["default"]
    bigger = Protocol(**{**base.to_dict(), "seeds": base.seeds + 1, "subsets": base.subsets + 2})
    trained = []

    class Counting(LocalExecutor):
        def run(self, fn, jobs):
            jobs = list(jobs)
            trained.extend(u for j in jobs for u in j.units)
            yield from super().run(fn, jobs)

    path = G.build(S, bigger, store=ResultsStore(tmp_path), executor=Counting(1), trainer="loop", **quiet)
    assert path.name == "v2"
    old_units = base.seeds * base.subsets
    assert len(trained) == bigger.seeds * bigger.subsets - old_units
    gt = _load(tmp_path)
    ref = G.GroundTruth.open(reference, S)
    assert np.array_equal(gt.masks[:base.subsets], ref.masks)  # old subsets unchanged
    assert np.array_equal(gt.outputs["margin"][:base.seeds, :base.subsets], ref.outputs["margin"])
    assert _load(tmp_path, version="v1").manifest["complete"]


def test_seed_policies():
    shared = Protocol(subsets=3, seeds=2, seed_policy="shared")
    varied = Protocol(subsets=3, seeds=2, seed_policy="varied")
    assert unit_seed(shared, Unit(0, 0)) == unit_seed(shared, Unit(0, 2)) == unit_seed(shared, Unit(0, None))
    assert unit_seed(shared, Unit(0, 0)) != unit_seed(shared, Unit(1, 0))
    assert len({unit_seed(varied, Unit(r, j)) for r in range(2) for j in range(3)}) == 6
    assert unit_seed(varied, Unit(1, None)) == unit_seed(shared, Unit(1, None))
    # the hash under every seed: canonical JSON (key order does not count, other values by their text), 16 hex
    from pathlib import PurePosixPath

    from benchmark.setup.config import stable_hash
    assert stable_hash({"a": 1, "b": [2, 3]}) == stable_hash({"b": [2, 3], "a": 1})
    assert stable_hash({"p": PurePosixPath("x/y")}) == stable_hash({"p": "x/y"})
    assert len(stable_hash([1])) == 16 and stable_hash([1], 8) == stable_hash([1])[:8]
    # the committed varied-seed study (results/gt-studies) recorded the seeds unit_seed derives today
    root = ResultsStore.default().gt_studies / "mnist-cnn" / "v1"
    protocol = Protocol(**read_json(root / MANIFEST)["protocol"])
    assert protocol.seed_policy == "varied"
    seeds = {}
    for unit in (Unit(0, 0), Unit(0, 1), Unit(1, 0), Unit(0, None)):
        with np.load(root / ("full" if unit.subset is None else "units") / f"{unit.name}.npz") as z:
            seeds[unit] = int(z["seed"])
        assert seeds[unit] == unit_seed(protocol, unit), unit
    assert len(set(seeds.values())) == 4


def test_protocol_validation():
    with pytest.raises(ValueError, match="alpha"):
        Protocol(alpha=1.0)
    with pytest.raises(ValueError, match="seed_policy"):
        Protocol(seed_policy="random")
    with pytest.raises(ValueError, match="exceed"):
        G.query_indices(Protocol(queries=90, validation_queries=20), 100)
    # queries and validation queries may fill the test set exactly: then they partition it
    q, v = G.query_indices(Protocol(queries=6, validation_queries=4), 10)
    assert len(q) == 6 and sorted(np.concatenate([q, v]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="exceed the 10 test points"):
        G.query_indices(Protocol(queries=6, validation_queries=5), 10)


def test_a_settings_trainer_choice_replaces_calibration(tmp_path, monkeypatch):
    """A setting that names its trainer (large models: "loop") is not calibrated; a bad choice is refused."""
    from benchmark.setup import training

    base = S
    looping = dataclasses.replace(base, name="synthetic-mlp-loop", trainer="loop")
    monkeypatch.setitem(settings._REGISTRY, "synthetic-mlp-loop", looping)
    monkeypatch.setattr(training, "choose_trainer", lambda *a, **k: pytest.fail("calibrated despite the setting"))
    small = Protocol(alpha=0.5, subsets=2, seeds=1, queries=8, validation_queries=4, full_models=1)
    root = G.build(looping, small, store=ResultsStore(tmp_path), trainer="auto", executor=LocalExecutor(1), **quiet)
    assert json.loads((root / MANIFEST).read_text())["environment"]["trainer"] == "loop"
    with pytest.raises(ValueError, match="trainer must be None, 'loop' or 'vmap'"):
        dataclasses.replace(base, trainer="fast")


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from benchmark import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "build", interrupted)
    assert cli.main(["--results", str(tmp_path), "gt", SETTING, "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run the same command again to resume" in err and f"gt {SETTING}" in err


@pytest.mark.parametrize("name", ["mnist-lr", "mnist-mlp-small"])
def test_committed_ground_truths_hold_the_queries_and_subsets_the_protocol_draws(name):
    """The drawing of queries and subsets is part of what a committed ground truth means: the code must still
    draw exactly the queries, validation queries and subsets the committed artifacts hold (no data needed)."""
    from benchmark.groundtruth.protocol import query_indices, subset_indices

    setting = settings.get(name)
    root = ResultsStore.default().gt / name / "v1"
    protocol = Protocol(**read_json(root / MANIFEST)["protocol"])
    q, v = query_indices(protocol, setting.data_spec.test_size)
    assert np.array_equal(np.load(root / "queries.npy"), q) and np.array_equal(np.load(root / "validation_queries.npy"), v)
    masks = np.unpackbits(np.load(root / "masks.npy"), axis=1, count=setting.data_spec.train_size).astype(bool)
    assert masks.shape[0] == protocol.subsets
    for j in (0, 1, protocol.subsets - 1):
        assert np.array_equal(np.flatnonzero(masks[j]), subset_indices(protocol, setting.data_spec.train_size, j))
    # every unit records the seed it was trained from: the seed derivation (unit_seed, stable_hash) still gives it
    for unit in (Unit(0, None), Unit(3, None), Unit(0, 0), Unit(1, 0), Unit(3, protocol.subsets - 1)):
        with np.load(root / ("full" if unit.subset is None else "units") / f"{unit.name}.npz") as z:
            assert int(z["seed"]) == unit_seed(protocol, unit), unit
    assert read_json(root / MANIFEST)["recipe_hash"] == setting.recipe_hash()  # stable_hash of the recipe
    # and they depend on the base seed and the data size, as the protocol says
    other = dataclasses.replace(protocol, base_seed=1)
    assert not np.array_equal(query_indices(other, setting.data_spec.test_size)[0], q)
    assert not np.array_equal(query_indices(protocol, setting.data_spec.test_size + 1)[0], q)
    assert not np.array_equal(subset_indices(other, setting.data_spec.train_size, 0), np.flatnonzero(masks[0]))

