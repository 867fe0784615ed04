"""Floor 7: the report — the browsable results site, rebuilt from the committed results in seconds to a minute
(every run record is checked now, as the leaderboard checks it) — and the list of files to commit that `report` and
`leaderboard` end with: the one answer to "what do I commit?" (docs/writing-a-solver.md)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from . import resolve

SMALL = 1 << 20  # files up to this size are compared by content; a larger one by its size and time


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    git = shutil.which("git")
    if git is None or not root.is_dir():
        return None
    return subprocess.run([git, "-C", str(root), *args], capture_output=True)


def clone_of(root: Path) -> Path | None:
    """The top of the git clone the results folder is committed in; None outside one (or where git ignores it)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0:
        return None
    ignored = _git(root, "check-ignore", "-q", ".")
    return None if ignored is not None and ignored.returncode == 0 else Path(top.stdout.decode().strip())


def snapshot(store) -> dict | None:
    """What :func:`files_to_commit` compares with afterwards: None inside a git clone (git knows what differs from
    the last commit), else each file's size, time and (small files) content hash under the results folder."""
    if not store.root.is_dir():
        return {}  # everything it will hold is new
    if clone_of(store.root) is not None:
        return None
    return {str(p.relative_to(store.root)): _stamp(p) for p in _files(store.root)}


def _files(root: Path):
    # dot-names are locks and folders being written, never results
    return (p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                     p.relative_to(root).parts))


def _stamp(path: Path) -> tuple:
    st = path.stat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size <= SMALL else None
    return st.st_size, st.st_mtime_ns, digest


def _changed(old: tuple | None, path: Path) -> bool:
    if old is None:
        return True
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) == old[:2]:
        return False
    return old[2] is None or st.st_size > SMALL or _stamp(path)[2] != old[2]


def files_to_commit(store, before: dict | None) -> tuple[str, list[tuple[str, str]]]:
    """(where the list comes from, [(mark, path)]): inside a git clone, `git status` of the results folder (every
    file that differs from the last commit, paths from the clone's top: M changed, ?? new, D deleted); elsewhere
    the files changed since ``before`` (:func:`snapshot`), relative to the results folder. The report, rebuilt as
    a whole, is one entry."""
    top = clone_of(store.root)
    if top is not None:
        out = _git(store.root, "status", "--porcelain", "-z", "--untracked-files=all", "--", ".")
        items, fields = [], out.stdout.decode().split("\0")
        while fields:
            entry = fields.pop(0)
            if not entry:
                continue
            items.append((entry[:2].strip(), entry[3:]))
            if entry[0] in "RC":  # a rename names its source next
                fields.pop(0)
        how, report = f"git status of {store.root.relative_to(top) if store.root != top else '.'}/", \
            str(store.report.relative_to(top))
    else:
        now = {str(p.relative_to(store.root)): p for p in _files(store.root)}
        before = before or {}
        items = [("M" if k in before else "??", k) for k, p in sorted(now.items()) if _changed(before.get(k), p)]
        items += [("D", k) for k in sorted(set(before) - set(now))]
        how, report = f"files written or changed under {store.root}", str(store.report.relative_to(store.root))
    inside = [i for i in items if i[1] == report or i[1].startswith(report + "/")]
    items = [i for i in items if i not in inside]
    if inside:
        items.append(("M", f"{report}/ ({len(inside)} files)"))
    return how, sorted(items, key=lambda i: i[1])


def print_files_to_commit(store, before: dict | None, log=print) -> list[str]:
    """End a command with the files to commit (:func:`files_to_commit`); returns their paths."""
    how, items = files_to_commit(store, before)
    if not items:
        log(f"Files to commit: none ({how}: nothing)")
        return []
    log(f"Files to commit ({how}):")
    for mark, path in items:
        log(f"  {mark:>2} {path}")
    paths = [path.split(" (")[0] for _, path in items]
    if clone_of(store.root) is not None:
        log("Commit them with the solver file: git add -A -- " + " ".join(paths))
    return paths


def write_report(store, log=print, *, out=None, keep_from=None, screenshot: bool = True):
    """The site from the run records, each checked now (``leaderboard.collect``: the one staleness rule), and the
    results beside them; then ``leaderboard.csv`` is checked against the same rows. A table that is missing,
    unreadable, cut short or out of date is an error naming it and the fix, raised after the site is written (the
    site does not depend on it). Also what `leaderboard` calls after writing its tables."""
    from ..evaluate import campaign, registry
    from ..report import leaderboard, site

    try:
        table, problem = leaderboard.read(store), None
    except (FileNotFoundError, leaderboard.TableError) as exc:
        table, problem = None, exc
    settings, methods = campaign.leaderboard_settings(), campaign.leaderboard_methods(registry.available())
    # the failed reruns the table notes are the one thing the records cannot tell: the site says them too
    df, found = leaderboard.collect(store, settings, methods,
                                    failures=leaderboard.noted_failures(table) if table is not None else None)
    index = site.build(store, settings, df, found, methods, out=out, keep_from=keep_from, screenshot=screenshot,
                       log=log)
    if problem is not None:
        raise problem
    leaderboard.check(store, df, table)
    return index


def _cmd_report(args) -> int:
    store = resolve.store(args, reading=True)  # a site of nothing would hide a mistyped --results
    store.check_writable(store.root)
    before = snapshot(store)
    write_report(store)
    print_files_to_commit(store, before)
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("report", help="write the results site results/report/ (index.html, a page per setting, "
                                      "images) from the committed results, every run record checked now; no "
                                      "recomputation")
    s.set_defaults(func=_cmd_report)
