"""Floor 7: sharing results — a setting's bundle (``export``, ``fetch``) and its ground truth as a Hugging Face
dataset (``export --format hf``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import resolve


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_export(args) -> int:
    store = resolve.store(args, reading=True)
    setting = resolve.setting(args.setting)
    out = Path(args.out).expanduser()
    t0 = time.perf_counter()
    if args.format == "hf":
        if args.pin:
            raise ValueError("--pin pins a bundle's root hash; a Hugging Face export (--format hf) has none to pin")
        from ..groundtruth import artifact, hf

        gt = artifact.load(store, setting, args.version)
        path = hf.export(gt, out, progress=not args.quiet)
        print(f"{path}  (Hugging Face dataset of {store.relative(gt.root)}, {time.perf_counter() - t0:.1f} s; "
              f"datasets.load_from_disk reads it)")
        return 0
    if args.version:
        raise ValueError("--version picks the ground truth of --format hf; a bundle holds every pinned version")
    from ..evaluate import share

    path, man = share.export(store, setting, out, pin=args.pin, progress=not args.quiet, log=_log)
    size = path.stat().st_size
    print(f"{path}  root hash {man['root_hash']}  ({len(man['members'])} files, {len(man['artifacts'])} artifacts, "
          f"{size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
          + ("; pinned in the package (benchmark/setup/bundles.json)" if args.pin else ""))
    return 0


def _cmd_fetch(args) -> int:
    from ..evaluate import share

    store = resolve.store(args)
    setting = resolve.setting(args.setting)
    t0 = time.perf_counter()
    summary = share.fetch(store, setting, args.source, expected_root=args.root_hash, progress=not args.quiet,
                          log=_log)
    for line in summary["verified"]:
        _log(f"verified {line}")
    print(f"fetched {setting.name} (bundle {summary['root_hash'][:16]}…) into {summary['results']}: "
          f"{len(summary['moved'])} new, {len(summary['kept'])} already there, {len(summary['pinned'])} pinned, "
          f"{summary['records']} run records checked ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("export", help="write a setting's pinned artifacts and run records as one checksummed bundle "
                       "(or its ground truth as a Hugging Face dataset with --format hf)")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--format", choices=["bundle", "hf"], default="bundle",
                   help="bundle: ground truth, zoo, mislabel artifacts and run records in one .tar.gz (default); "
                        "hf: the ground truth as a Hugging Face dataset folder")
    s.add_argument("--out", default="dist", help="folder to write into (default: dist/ in the current folder)")
    s.add_argument("--pin", action="store_true",
                   help="record the bundle's root hash as the one this package trusts (benchmark/setup/bundles.json)")
    s.add_argument("--version", help="with --format hf: the ground-truth version, e.g. v1 (default: the newest)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("fetch", help="verify a setting's bundle against its pinned root hash and unpack it into the "
                       "results folder")
    s.add_argument("setting", help=resolve.SETTING_HELP)
    s.add_argument("--from", dest="source", required=True, metavar="PATH_OR_URL",
                   help="the bundle file, or an http(s) URL (refused under TDABENCH_OFFLINE)")
    s.add_argument("--root-hash", metavar="HASH",
                   help="the root hash to trust instead of the one this package pins (e.g. your own export's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_fetch)
