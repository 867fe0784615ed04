"""Summarise the last mutation run (`make mutate`, docs/testing.md) into results/mutation/.

Run from the repository root after ``mutmut run``: reads mutmut's results under mutants/ and writes

- ``results/mutation/summary.md``: mutants, killed, survived and kill rate per module, for the mutant-name
  patterns the run covered (``--covered``);
- ``results/mutation/survivors.md``: every surviving mutant with its diff, and the reason it is equivalent
  when ``results/mutation/equivalent.json`` explains it (keyed by mutant name, with the mutated line, so an
  explanation stops applying when the code under it changes).

Exits 1 when a survivor is unexplained: kill it with a test that asserts a numerical truth, or explain why it
is equivalent in equivalent.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

OUT = Path("results/mutation")
EQUIVALENT = OUT / "equivalent.json"


def mutated_line(diff: str) -> str:
    """The changed lines of a mutant's diff (``+`` side), whitespace-normalised: what an explanation is about."""
    return " | ".join(" ".join(line[1:].split()) for line in diff.splitlines()
                      if line.startswith("+") and not line.startswith("+++"))


def collect(patterns: list[str]) -> tuple[dict[str, dict[str, int | None]], Counter]:
    """{module path: {mutant name: exit code}} for the mutants matching ``patterns``, and every module's count of
    mutants in all (a module covered by a sample of its mutants reports the sample out of that)."""
    out: dict[str, dict[str, int | None]] = {}
    generated: Counter = Counter()
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        chosen = {k: v for k, v in data.exit_code_by_key.items()
                  if not patterns or any(fnmatch.fnmatch(k, p) for p in patterns)}
        if chosen:
            out[str(path)] = chosen
            generated[str(path)] = len(data.exit_code_by_key)
    return out, generated


def _percent(rate: float | None) -> str:
    """A kill rate, or 'not run' for a module none of whose mutants was tested."""
    return "not run" if rate is None else f"{rate:.1%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--covered", nargs="*", default=[], help="the mutant-name patterns the run was given")
    ap.add_argument("--seconds", type=float, help="wall time of the run, for the summary")
    args = ap.parse_args(argv)

    results, generated = collect(args.covered)
    if not results:
        print("no mutation results under mutants/: run `make mutate` first", file=sys.stderr)
        return 2
    explained = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    rows, survivors, unexplained = [], [], 0
    totals: Counter = Counter()
    for path, codes in sorted(results.items()):
        status = Counter(status_by_exit_code[c] for c in codes.values())
        tested = sum(status.values()) - status["no tests"] - status["not checked"]
        killed = status["killed"] + status["timeout"] + status["segfault"]
        share = f"{len(codes)}" + (f" of {generated[path]}" if len(codes) < generated[path] else "")
        rows.append((path, share, killed, status["survived"], status["no tests"], status["not checked"],
                     killed / tested if tested else None))
        totals.update(mutants=len(codes), killed=killed, survived=status["survived"], tested=tested,
                      untested=status["no tests"], unchecked=status["not checked"])
        for name, code in sorted(codes.items()):
            if status_by_exit_code[code] != "survived":
                continue
            diff = get_diff_for_mutant(name, path=path)
            note = explained.get(name)
            ok = note is not None and note.get("line") == mutated_line(diff)
            unexplained += not ok
            survivors.append((path, name, diff, note["reason"] if ok else None))

    OUT.mkdir(parents=True, exist_ok=True)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# Mutation testing: summary", "",
        f"`make mutate` (mutmut, docs/testing.md) at commit {commit}, {when}"
        + (f", {args.seconds / 60:.1f} min wall time" if args.seconds else "") + ".", "",
        "Mutants covered: " + (", ".join(f"`{p}`" for p in args.covered) if args.covered else "all") + ".", "",
        "A mutant is *killed* when a test fails (or it times out); the kill rate is killed / tested. *No tests*: no "
        "selected fast test executes the mutated function. *n of N*: a fixed sample of the module's N mutants "
        "(the covered patterns name it).", "",
        "| module | mutants | killed | survived | no tests | not run | kill rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {p} | {n} | {k} | {s} | {u} | {c} | {_percent(r)} |" for p, n, k, s, u, c, r in rows]
    rate = totals["killed"] / totals["tested"] if totals["tested"] else None
    lines += [f"| **all** | {totals['mutants']} | {totals['killed']} | {totals['survived']} | {totals['untested']} "
              f"| {totals['unchecked']} | {_percent(rate)} |", "",
              f"Survivors: {len(survivors)}, of which {len(survivors) - unexplained} are explained as equivalent "
              f"(survivors.md) and {unexplained} are not."]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")

    body = ["# Mutation testing: surviving mutants", "",
            "Each survivor with its diff; *equivalent* ones say why no test can tell them apart (reasons in "
            "equivalent.json), *UNEXPLAINED* ones need a test that asserts a numerical truth.", ""]
    for path, name, diff, reason in survivors:
        body += [f"## `{name}`", "", f"**{'equivalent' if reason else 'UNEXPLAINED'}**" + (f": {reason}" if reason else ""),
                 "", "```diff", diff, "```", ""]
    (OUT / "survivors.md").write_text("\n".join(body) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUT / 'summary.md'} and {OUT / 'survivors.md'}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
