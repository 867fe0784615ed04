"""Floor 7: the report — the browsable results site, rebuilt from the committed results in seconds to a minute
(every run record is checked now, as the leaderboard checks it)."""

from __future__ import annotations

from . import resolve


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
    write_report(store)
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("report", help="write the results site results/report/ (index.html, a page per setting, "
                                      "images) from the committed results, every run record checked now; no "
                                      "recomputation")
    s.set_defaults(func=_cmd_report)
