"""Pins: a finished artifact without one is refused and marks what was derived from it UNPINNED; `tdabench pin`
verifies an artifact fully (retraining one unit per subset of a ground truth) before it pins anything.

Every tampering here rewrites the manifest's file hashes too, so the file checks alone pass it."""

import numpy as np
import pytest
from eval_helpers import synthetic_store, write_solver

from benchmark import cli
from benchmark.groundtruth import artifact as G
from benchmark.groundtruth import index, mislabel
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, ArtifactError, file_hashes, read_json, save_npz, write_json

S = settings.get("synthetic-mlp")


def _gt_root(store):
    return G.latest(store.gt, S)


def _rehash(root):
    man = read_json(root / MANIFEST)
    man["files"].update(file_hashes(root, list(man["files"])))
    write_json(root / MANIFEST, man)
    return man


def _unpin(store, root):
    pins = read_json(store.index)
    del pins["artifacts"][store.relative(root)]
    write_json(store.index, pins)


def _edit_unit(path, edit):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    save_npz(path, **arrays)


def _negate_margins(root):
    """The margins of every unit and full-data model negated; loss and correctness rows left as they were."""
    for name in [n for n in read_json(root / MANIFEST)["files"] if n.endswith(".npz")]:
        _edit_unit(root / name, lambda a: a["outputs"].__setitem__(0, -a["outputs"][0]))
    return _rehash(root)


def _swap_subsets(root, a=1, b=2):
    """Units of subsets a and b swapped in every replica: under the shared seed policy they record the same seed."""
    seeds = read_json(root / MANIFEST)["protocol"]["seeds"]
    for r in range(seeds):
        pa, pb = root / "units" / f"r{r:02d}_s{a:04d}.npz", root / "units" / f"r{r:02d}_s{b:04d}.npz"
        blob = pa.read_bytes()
        pa.write_bytes(pb.read_bytes())
        pb.write_bytes(blob)
    return _rehash(root)


def _cli(store, *words):
    return cli.main(["--results", str(store.root), *words])


def _refused(capsys, store, words, expect):
    """The command exits 2, and its error is one line, the last on stderr (after any progress), holding ``expect``."""
    assert _cli(store, *words) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [i for i, line in enumerate(err) if line.startswith("tdabench: error:")]
    assert errors == [len(err) - 1] and expect in err[-1], err


def _verify(store):
    return ["gt", S.name, "--verify"]


def _pin(store, root):
    return ["pin", store.relative(root), "--workers", "1"]


@pytest.mark.parametrize("kind,retrained,last", [("ensemble", 26, "r02_s0023"), ("base", 24, "r01_s0023")])
def test_an_untampered_artifact_verifies_and_pins(tmp_path, capsys, kind, retrained, last):
    """ensemble: 24 subsets x 3 seeds and 2 full-data models, all retrained; base: 2 seeds and one full-data model,
    checked against its weights only (no second one to measure seed noise by)."""
    store = synthetic_store(tmp_path, kind)
    root = _gt_root(store)
    pin = index.pinned(store, root)
    _unpin(store, root)  # a pin lost (a merge of index.json): the artifact itself is untouched
    _refused(capsys, store, _verify(store), f"{store.relative(root)} is UNPINNED")
    with pytest.raises(ArtifactError, match="UNPINNED"):
        G.load(store, S)
    assert _cli(store, *_pin(store, root)) == 0
    out = capsys.readouterr()
    assert f"pinned {store.relative(root)}" in out.out and f"{retrained} units retrained" in out.out
    assert f"  {last}: " in out.err  # one unit of every subset, spread over the replicas
    assert ("  full_k01: " in out.err) == (kind == "ensemble")
    assert index.pinned(store, root) == pin  # the same root hash as the build pinned
    assert _cli(store, *_verify(store)) == 0 and '"pinned": true' in capsys.readouterr().out


def test_negated_margins_without_a_pin_are_refused(tmp_path, capsys):
    """Issue 32, item 9: negated margins, re-hashed, the pin deleted — `gt --verify` used to pass it, flagging only
    `"pinned": false`. Now both refuse it in one line, and the records derived from it say UNPINNED."""
    store = synthetic_store(tmp_path)
    root = _gt_root(store)
    _negate_margins(root)
    _unpin(store, root)
    _refused(capsys, store, _verify(store), "is UNPINNED")
    _refused(capsys, store, _pin(store, root), "output rows that contradict each other")
    assert index.pinned(store, root) is None


def test_negated_margins_are_refused_even_when_pinned(tmp_path):
    """The three output rows of a unit bind each other (loss = softplus(-margin)): rewritten margins are caught on
    every open, even under a pin written by hand, without retraining anything."""
    store = synthetic_store(tmp_path)
    root = _gt_root(store)
    man = _negate_margins(root)
    index.pin(store, root, index.root_hash(man), "ground truth")
    with pytest.raises(ArtifactError, match=r"48 subset unit\(s\) hold output rows that contradict each other") as err:
        G.load(store, S)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("pinned", [True, False], ids=["old-pin-kept", "pin-deleted"])
def test_swapped_subsets_are_refused_by_verify_and_by_pin(tmp_path, capsys, pinned):
    """Issue 32, item 10: subsets 1 and 2 swapped in every replica and re-hashed pass every check that opening
    makes (same seeds, same ceiling, same summary); `pin` used to pin them. It now retrains one unit per subset."""
    store = synthetic_store(tmp_path, "ensemble")
    root = _gt_root(store)
    before = index.pinned(store, root)
    man = _swap_subsets(root)
    if not pinned:
        _unpin(store, root)
    _refused(capsys, store, _verify(store), "differs from the one pinned" if pinned else "is UNPINNED")
    with index.verifying(root, index.root_hash(man)):
        G.load(store, S)  # every check short of retraining passes: the pin is what vouches for the rest
    _refused(capsys, store, _pin(store, root), "2 of 26 retrained units are not the stored ones (r01_s0001, r02_s0002)")
    assert index.pinned(store, root) == (before if pinned else None)  # nothing pinned


def test_a_full_data_model_whose_outputs_are_not_its_weights_is_refused_by_pin(tmp_path, capsys):
    """With one full-data model there is no seed noise to judge its retrain by: its recorded outputs are checked
    against what its weights give instead. Here they are a subset unit's (a consistent margin, loss and correctness,
    and the full model's own seed)."""
    store = synthetic_store(tmp_path)  # one full-data model
    root = _gt_root(store)
    with np.load(root / "units" / "r00_s0000.npz") as z:
        other = z["outputs"].copy()
    _edit_unit(root / "full" / "full_k00.npz", lambda a: a.__setitem__("outputs", other))
    _rehash(root)
    _unpin(store, root)
    _refused(capsys, store, _pin(store, root), "full-data model 0's weights give margins")
    assert index.pinned(store, root) is None


def test_all_units_present_but_not_marked_complete_is_refused(tmp_path):
    """`complete` is outside the root hash: setting it to false would turn a finished, unpinned artifact into a
    build in progress, which needs no pin."""
    store = synthetic_store(tmp_path)
    root = _gt_root(store)
    man = read_json(root / MANIFEST)
    man["complete"] = False
    write_json(root / MANIFEST, man)
    _unpin(store, root)
    with pytest.raises(ArtifactError, match="every unit is present but the manifest is not marked complete") as err:
        G.load(store, S, allow_incomplete=True)
    assert f"tdabench gt {S.name}" in str(err.value)


def test_records_derived_from_an_unpinned_artifact_say_unpinned(tmp_path, monkeypatch):
    from benchmark.evaluate import records, registry

    folder = tmp_path / "solvers"
    write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    store = synthetic_store(tmp_path)
    cls = registry.get("toy-exact")
    rec = records.run(store, S, cls, search=False, device="cpu", log=lambda *a: None)
    assert records.stale_reasons(rec, store, S, cls) == {}
    _unpin(store, _gt_root(store))
    _unpin(store, mislabel.find(store, S, records.MISLABEL_SPEC))
    why = records.stale_reasons(rec, store, S, cls)
    assert sum("UNPINNED" in w for w in why["lds"]) == 1 and sum("UNPINNED" in w for w in why["mislabel"]) == 1
    rel = store.relative(mislabel.find(store, S, records.MISLABEL_SPEC))
    assert any(w.startswith(f"UNPINNED: {rel} ") and f"`tdabench --results {store.root.resolve()} pin {rel}`" in w
               for w in why["mislabel"])  # the command that pins it, in this store


def test_mislabel_and_zoo_artifacts_need_their_pins_and_pin_verifies_them(tmp_path, capsys):
    from benchmark.groundtruth import zoo
    from benchmark.groundtruth.executors import LocalExecutor

    store = synthetic_store(tmp_path)
    mis = mislabel.find(store, S, mislabel.Spec())
    _unpin(store, mis)
    with pytest.raises(ArtifactError, match="UNPINNED"):
        mislabel.open_artifact(store, mis, S)
    assert _cli(store, "pin", store.relative(mis)) == 0 and "label flips recomputed" in capsys.readouterr().out
    mislabel.open_artifact(store, mis, S)
    # labels rewritten with their hash: the flips recomputed from the spec tell, so nothing is pinned
    labels = np.load(mis / "labels.npy")
    labels[np.load(mis / "flipped.npy")[0]] += 1
    np.save(mis / "labels.npy", labels)
    _rehash(mis)
    _unpin(store, mis)
    _refused(capsys, store, ["pin", store.relative(mis)], "flips different points")
    assert index.pinned(store, mis) is None

    path = zoo.build(S, zoo.ZooSpec(models=1), store=store, executor=LocalExecutor(1), progress=False,
                     log=lambda *a: None)
    _unpin(store, path)
    with pytest.raises(ArtifactError, match="UNPINNED"):
        zoo.Zoo.open(store, path, S)
    assert _cli(store, "pin", store.relative(path)) == 0
    assert read_json(store.index)["artifacts"][store.relative(path)]["kind"] == "model zoo"
    zoo.Zoo.open(store, path, S)


def test_an_unfinished_ground_truth_needs_no_pin_and_cannot_be_pinned(tmp_path, capsys):
    store = synthetic_store(tmp_path)
    root = _gt_root(store)
    man = read_json(root / MANIFEST)
    for name in [n for n in man["files"] if n.startswith("units/r01_")][:2]:
        del man["files"][name]
        (root / name).unlink()
    man.update(complete=False, noise_ceiling=None, summary={}, units_done=man["units_done"] - 2)
    write_json(root / MANIFEST, man)
    _unpin(store, root)
    assert not G.load(store, S, allow_incomplete=True).pinned  # a build in progress: flagged, not refused
    _refused(capsys, store, _pin(store, root), "only finished artifacts are pinned")
