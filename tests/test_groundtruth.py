"""The ground-truth harness: resumable, extendable, self-verifying artifacts."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmark import groundtruth as G
from benchmark import settings
from benchmark.artifacts import ArtifactError
from benchmark.config import Protocol, Unit, unit_seed
from benchmark.executors import LocalExecutor

SETTING = "synthetic-mlp"
quiet = dict(progress=False, log=lambda *_: None)


def _build(root, **kw):
    # The trainer is pinned: "auto" times both, and loop and vmap agree only to float round-off.
    kw.setdefault("trainer", "loop")
    return G.build(SETTING, gt_root=root, executor=kw.pop("executor", LocalExecutor(1)), **quiet, **kw)


def _content(path):
    """Everything in an artifact except timings: masks, queries, unit outputs, checkpoints."""
    out = {}
    for f in sorted(path.rglob("*")):
        rel = str(f.relative_to(path))
        if f.suffix == ".npy":
            out[rel] = np.load(f)
        elif f.suffix == ".npz":
            with np.load(f) as z:
                out.update({f"{rel}:{k}": z[k] for k in z.files if k != "seconds"})
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
    return _build(root)


def test_complete_artifact_loads_and_verifies(reference):
    gt = G.GroundTruth.open(reference, settings.get(SETTING))
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
    model = gt.full_model(settings.get(SETTING), 0)
    assert isinstance(model, torch.nn.Module)
    summary = G.verify(SETTING, gt_root=reference.parent.parent)
    assert summary["complete"] and summary["files_verified"] == len(gt.manifest["files"])


def test_units_match_their_seed_and_subset(reference):
    """A unit's stored outputs are those of a model retrained from its recorded seed and subset."""
    from benchmark.training import evaluate, train

    s = settings.get(SETTING)
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
    path = tmp_path / SETTING / "v1"
    man = json.loads((path / "manifest.json").read_text())
    assert not man["complete"] and man["units_done"] == 8  # the 8th unit was written before the interrupt
    with pytest.raises(ArtifactError, match="incomplete"):
        G.load(SETTING, gt_root=tmp_path)
    # A crash mid-write leaves at most a temp file or an unreadable unit: both are redone.
    (path / "units" / "r01_s0000.npz").write_bytes(b"half a zip")
    (path / "units" / ".r01_s0001.npz.123.tmp").write_bytes(b"junk")
    again = _build(tmp_path, max_units=3)
    assert json.loads((again / "manifest.json").read_text())["units_done"] == 11
    assert _build(tmp_path) == path
    (path / "units" / ".r01_s0001.npz.123.tmp").unlink()
    _assert_same(_content(path), _content(reference))


def test_incomplete_study_names_the_command_that_resumes_it(tmp_path, monkeypatch):
    """Plain `tdabench gt SETTING` would start the default protocol's artifact: the hint must carry the study's
    protocol and --study, and that command must plan the same unfinished version."""
    import shlex

    from benchmark import cli

    monkeypatch.setattr(G, "STUDY_ROOT", tmp_path)
    default = settings.get(SETTING).protocols["default"]
    protocol = dataclasses.replace(default, subsets=default.subsets - 1, seed_policy="varied")
    path = _build(tmp_path, protocol=protocol, max_units=2)
    with pytest.raises(ArtifactError, match="incomplete") as err:
        G.load(SETTING, gt_root=tmp_path)
    command = str(err.value).split("`")[1]
    assert command == G.build_command(json.loads((path / "manifest.json").read_text()), path)
    asked = {}
    monkeypatch.setattr(G, "build", lambda name, protocol, *, gt_root, **kw: asked.update(
        name=name, protocol=protocol, gt_root=gt_root))
    assert cli.main(shlex.split(command)[1:]) == 0  # the real CLI, with the build it would start captured
    assert asked["protocol"] == protocol and asked["gt_root"] == tmp_path
    assert G.plan_version(settings.get(asked["name"]), asked["protocol"], asked["gt_root"]) == (path, None, False)
    # The benchmark's own artifact with the default protocol resumes with the plain command.
    monkeypatch.setattr(G, "STUDY_ROOT", tmp_path / "elsewhere")
    assert G.build_command({"setting": SETTING, "protocol": dataclasses.asdict(default)}, path) == f"tdabench gt {SETTING}"


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
    G.build(SETTING, gt_root=tmp_path, executor=LocalExecutor(1), progress=False, log=seen.append)
    assert any("(vmap," in line for line in seen), seen


def test_tampered_artifact_is_rejected(tmp_path, reference):
    import shutil

    copy = tmp_path / SETTING / "v1"
    shutil.copytree(reference, copy)
    victim = copy / "units" / "r00_s0002.npz"
    blob = bytearray(victim.read_bytes())
    blob[-30] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for .*r00_s0002\.npz"):
        G.load(SETTING, gt_root=tmp_path)
    victim.unlink()
    with pytest.raises(ArtifactError, match="missing file"):
        G.load(SETTING, gt_root=tmp_path)


def test_stale_recipe_is_rejected(reference, monkeypatch):
    s = settings.get(SETTING)
    changed = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=s.recipe.epochs + 1))
    with pytest.raises(ArtifactError, match=r"stale.*differs in: train"):
        G.GroundTruth.open(reference, changed)


def test_extending_trains_only_new_units_into_a_new_version(tmp_path, reference):
    import shutil

    shutil.copytree(reference, tmp_path / SETTING / "v1")
    base = settings.get(SETTING).protocols["default"]
    bigger = Protocol(**{**base.to_dict(), "seeds": base.seeds + 1, "subsets": base.subsets + 2})
    trained = []

    class Counting(LocalExecutor):
        def run(self, fn, jobs):
            jobs = list(jobs)
            trained.extend(u for j in jobs for u in j.units)
            yield from super().run(fn, jobs)

    path = G.build(SETTING, bigger, gt_root=tmp_path, executor=Counting(1), trainer="loop", **quiet)
    assert path.name == "v2"
    old_units = base.seeds * base.subsets
    assert len(trained) == bigger.seeds * bigger.subsets - old_units
    gt = G.load(SETTING, gt_root=tmp_path)
    ref = G.GroundTruth.open(reference)
    assert np.array_equal(gt.masks[:base.subsets], ref.masks)  # old subsets unchanged
    assert np.array_equal(gt.outputs["margin"][:base.seeds, :base.subsets], ref.outputs["margin"])
    assert G.load(SETTING, "v1", gt_root=tmp_path).manifest["complete"]


def test_seed_policies():
    shared = Protocol(subsets=3, seeds=2, seed_policy="shared")
    varied = Protocol(subsets=3, seeds=2, seed_policy="varied")
    assert unit_seed(shared, Unit(0, 0)) == unit_seed(shared, Unit(0, 2)) == unit_seed(shared, Unit(0, None))
    assert unit_seed(shared, Unit(0, 0)) != unit_seed(shared, Unit(1, 0))
    assert len({unit_seed(varied, Unit(r, j)) for r in range(2) for j in range(3)}) == 6
    assert unit_seed(varied, Unit(1, None)) == unit_seed(shared, Unit(1, None))


def test_protocol_validation():
    with pytest.raises(ValueError, match="alpha"):
        Protocol(alpha=1.0)
    with pytest.raises(ValueError, match="seed_policy"):
        Protocol(seed_policy="random")
    with pytest.raises(ValueError, match="exceed"):
        G.query_indices(Protocol(queries=90, validation_queries=20), 100)


def test_a_settings_trainer_choice_replaces_calibration(tmp_path, monkeypatch):
    """A setting that names its trainer (large models: "loop") is not calibrated; a bad choice is refused."""
    from benchmark import training

    base = settings.get(SETTING)
    monkeypatch.setitem(settings._REGISTRY, "synthetic-mlp-loop", dataclasses.replace(base, name="synthetic-mlp-loop",
                                                                                       trainer="loop"))
    monkeypatch.setattr(training, "choose_trainer", lambda *a, **k: pytest.fail("calibrated despite the setting"))
    small = Protocol(alpha=0.5, subsets=2, seeds=1, queries=8, validation_queries=4, full_models=1)
    root = G.build("synthetic-mlp-loop", protocol=small, gt_root=tmp_path, trainer="auto", executor=LocalExecutor(1),
                   **quiet)
    assert json.loads((root / G.MANIFEST).read_text())["environment"]["trainer"] == "loop"
    with pytest.raises(ValueError, match="trainer must be None, 'loop' or 'vmap'"):
        dataclasses.replace(base, trainer="fast")
