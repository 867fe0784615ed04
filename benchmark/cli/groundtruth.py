"""Floor 7: ground truth, the model zoo, and pinning artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import resolve


def _executor(args):
    from ..groundtruth.executors import LocalExecutor

    if getattr(args, "executor", "local") == "ray":
        from ..groundtruth.executors import RayExecutor

        if args.workers is not None:
            raise ValueError("--workers is for the local executor; Ray runs as many tasks as the cluster has room for")
        return RayExecutor(address=args.address, num_gpus_per_task=args.gpus_per_task,
                           num_cpus_per_task=args.cpus_per_task, max_retries=args.max_retries,
                           threads_per_worker=args.threads)
    if getattr(args, "address", None) is not None:
        raise ValueError("--address needs --executor ray")
    if args.workers is not None:
        return LocalExecutor(args.workers, args.threads or 0)
    return None


def _cmd_gt(args) -> int:
    from ..groundtruth import artifact, builder

    store = resolve.store(args, reading=bool(args.verify or args.reproduce is not None or args.reproduce_full))
    setting = resolve.setting(args.setting)
    study = args.study or setting.name != setting.name.partition("@")[0]
    if args.reproduce is not None or args.reproduce_full:
        return _reproduce(args, store, setting, study)
    if args.verify:
        summary = artifact.verify(store, setting, args.version, study)
        print(json.dumps(summary, indent=2))
        if summary["mixed_hardware"]:
            print(f"note: {summary['artifact']} was trained on more than one kind of hardware: "
                  + "; ".join(f"{n} units on {k}" for k, n in summary["hardware"].items()), file=sys.stderr)
        if not summary["complete"]:
            man = {"setting": setting.name, "protocol": summary["protocol"]}
            print(f"note: {summary['artifact']} is incomplete ({summary['units']} units); finish it with "
                  f"`{artifact.build_command(man, Path(summary['artifact']), setting, store)}`", file=sys.stderr)
            return 3 if args.require_complete else 0
        return 0
    protocol = builder.protocol_with(
        setting.protocols[args.protocol], alpha=args.alpha, subsets=args.subsets, seeds=args.seeds,
        queries=args.queries, validation_queries=args.validation_queries, full_models=args.full_models,
        seed_policy=args.seed_policy, base_seed=args.base_seed)
    builder.build(setting, protocol, store=store, study=study, executor=_executor(args), device=args.device,
                trainer=args.trainer, models_per_job=args.models_per_job, max_units=args.max_units,
                progress=not args.quiet)
    return 0


def _reproduce(args, store, setting, study) -> int:
    """Retrain drawn units and compare them with the committed ones; exit 1 only when one is not reproduced."""
    from ..groundtruth import artifact, reproduce
    from ..report.tables import reproduce_table
    from ..setup.training import default_device

    if args.verify:
        raise ValueError("--reproduce and --verify are separate commands; run one, then the other")
    gt = artifact.load(store, setting, args.version, study, allow_incomplete=True)
    units = reproduce.draw_units(gt, args.reproduce or 0, args.reproduce_full, args.draw_seed)
    rep = reproduce.reproduce(gt, units, executor=_executor(args), device=args.device or str(default_device()),
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    print(reproduce_table(rep))
    return 1 if rep["overall"]["verdict"] == reproduce.NOT_REPRODUCED else 0


def _cmd_zoo(args) -> int:
    from ..groundtruth import zoo

    zoo.build(resolve.setting(args.setting), zoo.ZooSpec(models=args.models, base_seed=args.base_seed),
              store=resolve.store(args), executor=_executor(args), device=args.device, progress=not args.quiet)
    return 0


# A manifest's kind (a ground truth's names none) -> the kind the index records.
PIN_KINDS = {"ground truth": "ground truth", "mislabel": "mislabel", "zoo": "model zoo", "retrain": "retraining"}


def _cmd_pin(args) -> int:
    """Verify an artifact fully, then pin its current root hash (after a deliberate, reviewed change, or a lost pin).
    Nothing is pinned unless every check passes: a pin vouches for what opening the artifact cannot recompute."""
    from ..groundtruth import index
    from ..setup.artifacts import MANIFEST, ArtifactError, read_json

    store = resolve.store(args, reading=True)
    for rel in args.artifact:
        root = store.root / rel
        man = read_json(root / MANIFEST)
        kind = man.get("kind", "ground truth")
        if kind not in PIN_KINDS:
            raise ArtifactError(f"{root} is a {kind!r} artifact; `tdabench pin` pins {', '.join(PIN_KINDS)} artifacts")
        if not index.holds_finished_work(man):
            raise ArtifactError(f"{root} is not finished; only finished artifacts are pinned (a build pins what it "
                                f"finishes): finish its build first")
        old, new = index.pinned(store, root), index.root_hash(man)
        with index.verifying(root, new):
            checked = _verify_for_pin(args, store, root, kind, resolve.setting(man["setting"]))
        index.pin(store, root, new, PIN_KINDS[kind])
        print(f"pinned {store.relative(root)}: {new[:16]}…" + (f" (was {old[:16]}…)" if old and old != new else "")
              + f"; verified: {checked}")
    return 0


def _verify_for_pin(args, store, root: Path, kind: str, setting) -> str:
    """Everything that can be checked about the artifact at ``root`` before it is pinned; what was checked, in words.
    Raises ArtifactError (one line) at the first thing that fails."""
    from ..setup.artifacts import ArtifactError

    if kind == "mislabel":
        from ..groundtruth import mislabel

        mislabel.open_artifact(store, root, setting, verify=True)
        return "checksums, recipe, and the label flips recomputed from the spec (its model is not retrained)"
    if kind in ("zoo", "retrain"):
        from ..groundtruth import retrain, zoo

        (zoo.Zoo if kind == "zoo" else retrain.Retrained).open(store, root, setting, verify=True)
        return "checksums and recipe (its models are not retrained)"
    from ..groundtruth.artifact import GroundTruth
    from ..setup.config import Unit

    gt = GroundTruth.open(root, setting, store=store)
    gt.check_full_models()
    p = gt.protocol
    if p.seeds < 2:
        raise ArtifactError(f"{root} has one seed replica per subset: a retrained unit has no seed noise to be told "
                            f"apart from, so `tdabench pin` cannot verify that its units hold their subsets' models; "
                            f"restore its pin from version control, or rebuild it with two or more --seeds")
    # A unit records its seed, not its subset: only retraining tells a unit from another subset's (under the shared
    # seed policy every subset of a replica has one seed). One unit per subset, spread over the replicas, catches
    # any reordering of the subsets; full-data models are retrained where a second one gives the seed noise.
    units = [Unit(j % p.seeds, j) for j in range(p.subsets)]
    units += [Unit(k, None) for k in range(p.full_models)] if p.full_models > 1 else []
    per_unit = (gt.manifest.get("summary") or {}).get("mean_seconds_per_subset_model") or 0
    print(f"{store.relative(root)}: retraining {len(units)} units (one per subset"
          + (f", and the {p.full_models} full-data models" if p.full_models > 1 else "")
          + f") to check that each holds the model of its subset and seed; at the build's {per_unit:.3g} s a subset "
            f"model, about {per_unit * p.subsets / 60:.0f} min before the full-data models",
          file=sys.stderr, flush=True)
    bad, identical = _retrain_and_compare(gt, units, args)
    if bad:
        raise ArtifactError(
            f"{root}: {len(bad)} of {len(units)} retrained units are not the stored ones ({', '.join(bad[:6])}"
            f"{' …' if len(bad) > 6 else ''}): they do not hold the models of their subsets and seeds (swapped or "
            f"rewritten); not pinned. Restore it from version control, or build a new version with "
            f"`tdabench gt {setting.name}`")
    return (f"checksums, recipe, protocol, output rows, ceiling and summary; full-data models' outputs from their "
            f"weights; {len(units)} units retrained ({identical} identical, the rest within round-off)")


def _retrain_and_compare(gt, units, args) -> tuple[list[str], int]:
    """Retrain ``units`` of ``gt``: the names of those that are not the stored ones, and how many came out identical.
    A retrain must pass ``--reproduce``'s rule (within round-off: half of seed noise) *and* be closer to its own
    stored unit than to any other of its replica (full-data model: to any other full-data model) — where subsets
    matter less than seeds, another subset's unit of the same seed can pass the first alone."""
    import numpy as np
    import torch

    from ..groundtruth import reproduce
    from ..groundtruth.executors import LocalExecutor
    from ..setup.training import default_device

    device = args.device or str(default_device())
    executor = _executor(args) or LocalExecutor.auto(torch.device(device), "loop")
    jobs = [reproduce.RetrainJob(gt.setting, gt.protocol, (u,), device, executor.threads_per_worker) for u in units]
    by_name = {u.name: u for u in units}
    bad, identical = [], 0
    for results in executor.run(reproduce.run_retrain_job, jobs):
        for r in results:
            u = by_name[r["unit"]]
            rec = reproduce.compare_unit(gt, u, r)
            stored = gt.full_outputs["margin"] if u.subset is None else gt.outputs["margin"][u.replica]
            dist = np.abs(stored.astype(np.float64) - r["outputs"][0]).mean(axis=1)
            own = u.replica if u.subset is None else u.subset
            nearest_other = float(np.delete(dist, own).min()) if len(dist) > 1 else float("inf")
            closest = bool(dist[own] < nearest_other)
            identical += rec["identical"]
            if rec["verdict"] == reproduce.NOT_REPRODUCED or not closest:
                bad.append(u.name)
            print(f"  {u.name}: {r['seconds']:.3g} s, {rec['verdict']}"
                  + ("" if closest else ", closer to another stored unit than to its own")
                  + f" (mean |Δ margin| to its stored unit {dist[own]:.3g}, to the nearest other {nearest_other:.3g}; "
                    f"two seeds: {rec['yardstick']['mean_abs_diff']:.3g})", file=sys.stderr, flush=True)
    return bad, identical


def _ray_options(s) -> None:
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where units run: this machine (default) or a Ray cluster (pip install 'tdabench[distributed]')")
    s.add_argument("--address", help="with --executor ray: the cluster's address, e.g. HEAD:6379 or 'auto' "
                   "(default: start a Ray instance on this machine)")
    s.add_argument("--gpus-per-task", type=float, default=0.0,
                   help="with --executor ray: GPUs per unit; a fraction lets several small models share a GPU")
    s.add_argument("--cpus-per-task", type=float, default=1.0, help="with --executor ray: CPUs per unit")
    s.add_argument("--max-retries", type=int, default=3,
                   help="with --executor ray: reruns of a unit whose worker or node died")


def add_commands(sub) -> None:
    s = sub.add_parser("gt", help="build, resume, extend, repair or verify a ground-truth artifact")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--verify", action="store_true", help="verify the newest (or --version) artifact and print a summary")
    s.add_argument("--require-complete", action="store_true", help="with --verify: exit 3 if the artifact is incomplete")
    s.add_argument("--study", action="store_true",
                   help="a study artifact (e.g. --seed-policy varied) under results/gt-studies/, which the benchmark "
                        "never uses as its ground truth; implied by a derived setting such as mnist-cnn@epochs=3")
    s.add_argument("--version", help="artifact version to verify or reproduce, e.g. v1 (default: the newest)")
    s.add_argument("--reproduce", type=int, metavar="N",
                   help="retrain N randomly drawn subset units from their recorded seeds and compare them with the "
                        "committed ones and with seed noise; exit 1 if one is not reproduced")
    s.add_argument("--reproduce-full", type=int, default=0, metavar="K",
                   help="with --reproduce: also retrain K randomly drawn full-data models (weights compared too)")
    s.add_argument("--draw-seed", type=int, default=0, help="with --reproduce: the seed that draws the units")
    s.add_argument("--protocol", default="default", help="named protocol of the setting (default: default)")
    s.add_argument("--alpha", type=float)
    s.add_argument("--subsets", type=int, help="M, the number of random subsets")
    s.add_argument("--seeds", type=int, help="R, seed replicas per subset")
    s.add_argument("--queries", type=int, help="Q, reported test queries")
    s.add_argument("--validation-queries", type=int, help="V, disjoint test queries for tuning")
    s.add_argument("--full-models", type=int, help="K, full-data models to explain")
    s.add_argument("--seed-policy", choices=["shared", "varied"])
    s.add_argument("--base-seed", type=int)
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--trainer", choices=["auto", "loop", "vmap"], default="auto")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core on CPU, 1 on GPU)")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    _ray_options(s)
    s.add_argument("--models-per-job", type=int, default=100, help="models trained together by vmap")
    s.add_argument("--max-units", type=int, help="stop after this many units (the artifact stays incomplete)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_gt)

    s = sub.add_parser("zoo", help="train explained models with per-epoch checkpoints -> results/models/<setting>/")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--models", type=int, default=8, help="models the zoo should hold (it only grows; default 8)")
    s.add_argument("--base-seed", type=int, default=0)
    s.add_argument("--device")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core on CPU)")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    _ray_options(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_zoo)

    s = sub.add_parser("pin", help="verify a finished artifact fully, then pin its root hash in results/index.json "
                       "(after a reviewed change); a ground truth has one unit per subset retrained")
    s.add_argument("artifact", nargs="+", help="artifact folder relative to the results folder, e.g. gt/mnist-lr/v1")
    s.add_argument("--device", help="where a ground truth's units are retrained: cpu or cuda (default: cuda when "
                   "available)")
    s.add_argument("--workers", type=int, help="local worker processes for retraining")
    s.add_argument("--threads", type=int, help="torch threads per worker")
    _ray_options(s)
    s.set_defaults(func=_cmd_pin)
