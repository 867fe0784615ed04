"""Floor 7: the report — the browsable results site, rebuilt from the committed results in seconds."""

from __future__ import annotations

from . import resolve


def write_report(store, log=print):
    """The site from the leaderboard table last written and the results beside it (also what `leaderboard` calls
    after writing its tables, so the report is always as current as they are)."""
    from ..evaluate import campaign, registry
    from ..report import leaderboard, site

    df, found = leaderboard.read(store)
    return site.build(store, campaign.leaderboard_settings(), df, found,
                      campaign.leaderboard_methods(registry.available()), log=log)


def _cmd_report(args) -> int:
    store = resolve.store(args)
    store.check_writable(store.root)
    write_report(store)
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("report", help="write the results site results/report/ (index.html, a page per setting, "
                                      "images) from the committed results; no recomputation")
    s.set_defaults(func=_cmd_report)
