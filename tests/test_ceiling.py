"""The ceiling study: the noise ceiling's bias and the corrected ceiling written per committed ground truth."""

import json

import pytest

from benchmark.core.stats import CeilingSimulation, ceiling_bias
from benchmark.setup import settings
from benchmark.setup.artifacts import ArtifactError
from benchmark.studies import ceiling
from eval_helpers import synthetic_store

S = settings.get("synthetic-mlp")
SIM = CeilingSimulation(repeats=2, calibration_steps=2, calibration_draws=1, seed=3)


def test_ceiling_study_writes_each_ground_truths_correction(tmp_path):
    store = synthetic_store(tmp_path)
    ceiling.run(store, ceiling.CeilingStudy(settings=(S,), simulation=SIM), log=lambda *a: None)
    doc = json.loads(ceiling.path(store).read_text())
    entry = doc["settings"][S.name]
    from benchmark.groundtruth import artifact

    gt = artifact.load(store, S)
    assert entry["root_hash"] == gt.root_hash() and ceiling.stale(store, S, entry) is None
    assert entry["recorded_ceiling"] == gt.manifest["noise_ceiling"][S.measurement]["lds_ceiling"]
    # the entry is ceiling_bias of the target every run record uses: reported queries, every replica
    expect = ceiling_bias(gt.outputs[S.measurement][gt.complete_replicas()][:, :, :len(gt.queries)], sim=SIM)
    for key in ("lds_ceiling", "bias", "bias_se", "corrected", "corrected_se", "interval"):
        assert entry[key] == pytest.approx(expect[key], rel=1e-12), key
    assert entry["rows"] == {}  # no run records in this store
    assert ceiling.stale(store, S, {**entry, "root_hash": "0" * 64}).startswith("computed on ground truth 000000")


def test_ceiling_study_refuses_a_manifest_whose_ceiling_is_not_its_outputs(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path)
    real = ceiling.ceiling_bias
    monkeypatch.setattr(ceiling, "ceiling_bias", lambda *a, **k: {**real(*a, **k), "lds_ceiling": -1.0})
    with pytest.raises(ArtifactError, match="is not what its outputs give"):
        ceiling.run(store, ceiling.CeilingStudy(settings=(S,), simulation=SIM), log=lambda *a: None)
    assert not ceiling.path(store).exists()
