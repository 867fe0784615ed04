"""Floor 7: the command line — the only floor that turns names into objects.

It parses arguments, resolves setting and solver names through the registries, makes one
:class:`~benchmark.setup.store.ResultsStore` (``--results`` or ``$TDABENCH_RESULTS``, else the repository's
``results/``), and calls the floors below with those objects. Errors the user can act on are one line on
stderr and exit status 2; Ctrl-C is one line that says how to resume.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import counterfactual, datamodels, evaluation, external, frontier, groundtruth, info, report, share, studies


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdabench", description="Benchmark of influence-function solvers for "
                                "training-data attribution (LDS, mislabel detection, IHVP error, cost).")
    p.add_argument("--results", metavar="DIR",
                   help="the results folder to read and write (default: $TDABENCH_RESULTS, else the repository's "
                        "results/)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (info, groundtruth, evaluation, external, studies, counterfactual, datamodels, frontier, report,
                   share):
        module.add_commands(sub)
    return p


def main(argv=None) -> int:
    # Parsed before anything heavy is imported: `--help` and argument errors answer without loading torch.
    args = build_parser().parse_args(argv)
    from ..evaluate.engine import RunError
    from ..evaluate.solver import SolverError
    from ..groundtruth.executors import ExecutorError
    from ..setup.artifacts import ArtifactError
    from ..setup.data import DataError
    from ..setup.deps import MissingDependency
    from ..setup.plugins import EmptyRegistry
    from ..setup.store import StoreError, describe_os_error
    from ..studies.regress import RegressionError

    # torch's own forward-mode decompositions (torch/_decomp/decompositions_for_jvp.py) script a graph on
    # first use and warn that torch.jit.script is deprecated; nothing here can act on it.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    try:
        return args.func(args)
    except (ArtifactError, DataError, KeyError, ValueError, RunError, RegressionError, SolverError,
            FileNotFoundError, MissingDependency, ExecutorError, StoreError, EmptyRegistry) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tdabench: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that cannot be written: one line, not a traceback
        print(f"tdabench: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ntdabench: interrupted. Finished work is kept (written unit by unit, atomically); run the same "
              f"command again to resume: tdabench {' '.join(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
