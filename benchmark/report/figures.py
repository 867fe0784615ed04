"""Floor 6: every figure, drawn from results on disk (records, studies), never computing one.

- :func:`leaderboard`: LDS with 95% intervals, the noise ceiling and the paper's value; recall vs fraction inspected;
- :func:`gap_study`: the Table 1 gap study as a dot plot of LDS per factor level;
- :func:`ihvp_error`: the IHVP-error study's four panels per setting;
- :func:`remove_top_k` and :func:`unlearning`: the counterfactual-retraining studies (margin drop and flip rate vs k;
  distance ratio and recovered accuracy vs forget-set size);
- :func:`influence_grid` (the paper's Fig. 1 and appendix Figs. 4-7) and :func:`self_influence_top` (Fig. 2),
  from the qualitative study's data (:mod:`benchmark.studies.qualitative`);
- :func:`frontier`: the cost–quality frontier, LDS against compute and trained models per family.
"""

from __future__ import annotations

import contextlib
import itertools
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..evaluate.engine import BASELINES
from ..studies.gap import grid_rows
from .leaderboard import RECALL_KEYS, fmt_params, setting_order

POSITIVE, NEGATIVE = "#1a7f37", "#c62828"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_name(data, y: int) -> str:
    """A class's name (its index where the names are only digits)."""
    names = data.class_names
    return names[y] if names and len(names) > y and not names[y].isdigit() else str(y)


def image_array(img: torch.Tensor) -> np.ndarray:
    """A normalised image tensor as something to look at: (H, W) grey or (H, W, 3) colour, in [0, 1] (the
    dataset's normalisation undone per image, as a grey imshow would scale it)."""
    arr = img.detach().cpu().float()
    arr = arr.permute(1, 2, 0) if arr.dim() == 3 and arr.shape[0] == 3 else arr.squeeze()
    return ((arr - arr.min()) / (arr.max() - arr.min() + 1e-12)).numpy()


def thumbnail(img: torch.Tensor, out: Path, max_px: int = 96) -> Path:
    """``img`` as a PNG file at most ``max_px`` on a side (MNIST's 28 px stay as they are; the page scales them)."""
    from PIL import Image

    pic = Image.fromarray(np.round(image_array(img) * 255).astype(np.uint8))
    if max(pic.size) > max_px:
        pic.thumbnail((max_px, max_px), Image.LANCZOS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out, optimize=True)
    return out


def _show(ax, img: torch.Tensor, caption: str, color: str | None = None, title: str | None = None):
    arr = image_array(img)
    ax.imshow(arr, cmap=None if arr.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if color:
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5)
    ax.set_xlabel(caption, fontsize=7, labelpad=2)
    if title:
        ax.set_title(title, fontsize=8, pad=3)


def leaderboard(df: pd.DataFrame, records: dict, out_dir: Path, log=print) -> list[Path]:
    """LDS with 95% intervals, the noise ceiling and the paper's value; recall vs fraction inspected."""
    plt = _plt()
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    palette = solver_palette(df["solver"])

    lds = df[df["lds"].notna()]
    if len(lds):
        settings = setting_order(lds["setting"])
        fig, axes = plt.subplots(1, len(settings), figsize=(1.2 + 2.2 * max(3, lds.groupby("setting").size().max())
                                                            * len(settings) / 2, 4.2), squeeze=False, sharey=True)
        for ax, setting in zip(axes[0], settings):
            part = lds[lds["setting"] == setting].reset_index(drop=True)
            x = np.arange(len(part))
            ax.bar(x, part["lds"], color=[palette[s] for s in part["solver"]], width=0.7)
            err = np.vstack([part["lds"] - part["lds_ci_low"], part["lds_ci_high"] - part["lds"]])
            ax.errorbar(x, part["lds"], yerr=err, fmt="none", ecolor="black", capsize=4, lw=1.2)
            ceil = part["lds_ceiling"].dropna()
            if len(ceil):
                ax.axhline(ceil.iloc[0], color="grey", ls=":", lw=1.5, label=f"noise ceiling {ceil.iloc[0]:.2f}")
            paper = part["paper_lds"].dropna()
            if len(paper):
                ax.axhline(paper.iloc[0], color="crimson", ls="--", lw=1.5, label=f"paper {paper.iloc[0]:.2f}")
            labels = [s + ("*" if "incomplete" in (st or "").lower() else "")
                      + (" (stale)" if "STALE" in (st or "") else "") for s, st in zip(part["solver"], part["status"])]
            ax.set_xticks(x, labels, rotation=30, ha="right")
            ax.set_title(setting + ("\n* incomplete ground truth" if any("*" in lab for lab in labels) else ""))
            ax.legend(loc="upper right", fontsize=8, frameon=True)
        axes[0][0].set_ylabel("LDS (mean over queries, 95% CI)")
        ymax = np.nanmax(np.concatenate([lds["lds_ci_high"].to_numpy(float), lds["paper_lds"].to_numpy(float),
                                         lds["lds_ceiling"].to_numpy(float)]))
        ymin = min(0.0, float(np.nanmin(lds["lds_ci_low"].to_numpy(float))))
        axes[0][0].set_ylim(ymin - 0.02, min(1.0, ymax + 0.08))
        fig.tight_layout()
        path = out_dir / "lds.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    else:
        log("no LDS figure: no run has an LDS yet")

    mis = [(k, r["mislabel"]) for k, r in records.items() if r.get("mislabel")]
    if mis:
        settings = setting_order(k[0] for k, _ in mis)
        fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False, sharey=True)
        for ax, setting in zip(axes[0], settings):
            _recall_panel(ax, setting, [(k[1], m) for k, m in mis if k[0] == setting], palette)
        axes[0][0].set_ylabel("flipped labels found (recall)")
        fig.tight_layout()
        path = out_dir / "mislabel_recall.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    else:
        log("no mislabel figure: no run has mislabel results yet")
    return written


@contextlib.contextmanager
def house_style():
    """The leaderboard's look (seaborn's white grid) from matplotlib's defaults, whatever was drawn before in this
    process, and undone afterwards: the same results always give the same image files."""
    import matplotlib
    import seaborn as sns

    _plt()
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        sns.set_theme(style="whitegrid", context="notebook")
        yield


# A solver's slot gives its colour (ten colorblind-safe ones; similar hues, orange/vermillion and pinks, kept apart)
# and, for each further ten slots, the next marker shape: no two slots below 70 look alike.
COLOUR_ORDER = (0, 1, 2, 4, 9, 5, 3, 8, 6, 7)
SHAPES = "osD^vPX"


class Palette(dict):
    """{solver: colour}, with the slot each solver's colour and marker come from (:func:`solver_slots`)."""

    def __init__(self, colours: dict, slots: dict):
        super().__init__(colours)
        self.slots = slots


def solver_slots(names, keep: dict | None = None) -> dict:
    """A slot per solver: the one ``keep`` (an earlier drawing's {solver: slot}) gives it, else the lowest free one,
    in name order; so a solver added later recolours none drawn before. Without ``keep``: slots in name order."""
    names = sorted(set(names) - set(BASELINES))
    slots, taken = {}, set()
    for name, slot in sorted((keep or {}).items()):
        if name in names and isinstance(slot, int) and slot >= 0 and slot not in taken:
            slots[name] = slot
            taken.add(slot)
    free = (i for i in itertools.count() if i not in taken)
    slots.update({n: next(free) for n in names if n not in slots})
    return dict(sorted(slots.items()))


def solver_palette(names, keep: dict | None = None) -> Palette:
    """One colour per solver, the same in every figure drawn from the same leaderboard (``keep``: see
    :func:`solver_slots`)."""
    import seaborn as sns

    cb = sns.color_palette("colorblind", 10)
    slots = solver_slots(names, keep)
    colours = {n: cb[COLOUR_ORDER[s % len(COLOUR_ORDER)]] for n, s in slots.items()}
    colours.update({"baseline-random": (0.6, 0.6, 0.6), "baseline-loss": (0.1, 0.1, 0.1)})
    return Palette(colours, slots)


def _recall_panel(ax, setting: str, items: list, palette: dict) -> None:
    """Recall against the share of training data inspected, for ``items`` = [(solver, mislabel section)]."""
    for solver, m in items:
        f = np.asarray(m["recall_curve"]["fractions"])
        r = np.asarray(m["recall_curve"]["recall"])
        keep = f <= 0.5 + 1e-9
        style = {"baseline-random": dict(color="grey", ls=":", label="random order"),
                 "baseline-loss": dict(color="black", ls="--", label="training loss")}.get(
            solver, dict(color=palette.get(solver), ls="-", label=f"{solver} self-influence"))
        ax.plot(100 * f[keep], r[keep], lw=1.8, **style)
        ax.plot([10, 20, 30, 40, 50], [m[k] for k in RECALL_KEYS], "o", ms=4, color=style["color"])
    p = items[0][1]["artifact"]["spec"]["fraction"]
    ax.plot([0, 100 * p, 50], [0, 1, 1], color="lightgrey", lw=1, zorder=0, label="perfect ranking")
    ax.set_title(f"{setting}: {p:.0%} labels flipped")
    ax.set_xlabel("training data inspected (%)")
    ax.set_xlim(0, 50)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)


def mislabel_recall(setting: str, items: list, palette: dict, out: Path) -> Path:
    """One setting's mislabel recall curves (``items`` = [(solver, the record's mislabel section)])."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    _recall_panel(ax, setting, items, palette)
    ax.set_ylabel("flipped labels found (recall)")
    return _save(fig, out, 110)


def solver_markers(palette: dict) -> dict:
    """A marker per solver such that no two solvers share both colour and marker: :func:`solver_palette` cycles ten
    colours through the slots, so each further ten take the next shape (baselines: circles)."""
    slots = getattr(palette, "slots", None) or solver_slots(palette)
    return {**{n: SHAPES[(s // 10) % len(SHAPES)] for n, s in slots.items()}, **{b: "o" for b in BASELINES}}


def lds_vs_cost(part: pd.DataFrame, palette: dict, out: Path) -> Path:
    """One setting's leaderboard rows as LDS (95% CI) against cost (fit + score seconds, log scale), with the noise
    ceiling and the paper's value: the trade-off a user chooses on. Points carry their solver's name; the legend
    holds the reference lines (ceiling, paper, and rows without a cost such as the random baseline)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    markers = solver_markers(palette)
    rows = part[part["lds"].notna()].sort_values("lds")
    points = []
    for _, r in rows.iterrows():
        colour = palette.get(r["solver"], "grey")
        stale = "STALE" in (r["status"] or "")
        label = r["solver"] + (" (stale)" if stale else "")
        if pd.isna(r["fit_s"]) or pd.isna(r["score_s"]):
            ax.axhline(r["lds"], color=colour, ls=":", lw=1.2, label=label)
            continue
        cost = r["fit_s"] + r["score_s"]
        ax.errorbar([cost], [r["lds"]], yerr=[[r["lds"] - r["lds_ci_low"]], [r["lds_ci_high"] - r["lds"]]],
                    fmt=markers.get(r["solver"], "o"), ms=7, capsize=3, color=colour,
                    mfc="white" if stale else colour)
        points.append((cost, r["lds"], label))
    ceiling, paper = part["lds_ceiling"].dropna(), part["paper_lds"].dropna()
    if len(ceiling):
        ax.axhline(ceiling.iloc[0], color="grey", ls="--", lw=1.3, label=f"noise ceiling {ceiling.iloc[0]:.2f}")
    if len(paper):
        ax.axhline(paper.iloc[0], color="crimson", ls="-.", lw=1.3, label=f"paper {paper.iloc[0]:.2f}")
    ax.set_xscale("log")
    from matplotlib.ticker import LogFormatter

    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 200, not 2×10²
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels minor ticks only on a short range
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("cost: fit + score seconds (log scale)")
    ax.set_ylabel("LDS (95% CI)")
    ax.set_title(part["setting"].iloc[0], fontsize=10)
    ax.margins(x=0.15)  # room for the names beside the points
    _place_labels(fig, ax, points)
    if ax.get_legend_handles_labels()[0]:  # below the axes: it never hides a point
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    return _save(fig, out, 110)


def _place_labels(fig, ax, points: list, fontsize: int = 8) -> None:
    """Name each point where its label overlaps no other label or point: the first free of a few offsets around
    it (greedy, in screen coordinates; ties go to the right-hand side)."""
    fig.canvas.draw()  # fixes the axes' scales, so data map to pixels as they will be drawn
    to_px = ax.transData.transform
    px_per_pt = fig.dpi / 72
    char_w, line_h = 0.6 * fontsize * px_per_pt, 1.2 * fontsize * px_per_pt
    marks = [to_px((x, y)) for x, y, _ in points]
    taken = [(mx - 5 * px_per_pt, my - 5 * px_per_pt, mx + 5 * px_per_pt, my + 5 * px_per_pt) for mx, my in marks]
    offsets = [(7, 3), (7, -11), (-7, 3), (-7, -11), (7, 13), (7, -21), (-7, 13), (-7, -21)]

    def box(mx, my, dx, dy, text):
        w = len(text) * char_w
        x0 = mx + dx * px_per_pt - (w if dx < 0 else 0)
        y0 = my + dy * px_per_pt
        return x0, y0, x0 + w, y0 + line_h

    def free(b):
        return all(b[2] <= t[0] or t[2] <= b[0] or b[3] <= t[1] or t[3] <= b[1] for t in taken)

    for (x, y, text), (mx, my) in zip(points, marks):
        choice = next((o for o in offsets if free(box(mx, my, *o, text))), offsets[0])
        b = box(mx, my, *choice, text)
        taken.append(b)
        ax.annotate(text, (x, y), xytext=choice, textcoords="offset points", fontsize=fontsize,
                    ha="right" if choice[0] < 0 else "left")


def _save(fig, out: Path, dpi: int = 120, *, tight: bool = True) -> Path:
    """Write ``fig`` (laid out tightly unless the caller already laid it out) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


FRONTIER_EXTRAPOLATE_TO = 1024  # members an unreachable family's dashed curve is drawn out to


def frontier(doc: dict, out: Path, datamodels: list[dict] | None = None) -> Path:
    """The cost–quality frontier (:mod:`benchmark.studies.frontier`): LDS against compute seconds (left) and trained
    models (right), log x, one line per family (``datamodels``: the retraining family's points, if given), the noise
    ceiling and the two targets drawn, each fitted family's extrapolation dashed."""
    from ..studies.frontier import CURVES, TARGET_LDS, TARGET_OF_CEILING

    plt = _plt()
    ceiling = doc.get("ceiling")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    families = [f["name"] for f in doc["families"]] + (["datamodels"] if datamodels else [])
    for i, name in enumerate(families):
        color = colors[i % len(colors)]
        if name == "datamodels":
            pts = [{"compute_s": p["compute_s"], "trained_models": p["members"], "members": p["members"],
                    "lds": {"mean": p["lds"], "se": p.get("lds_se") or 0.0}} for p in datamodels]
        else:
            pts = [p for p in doc["points"] if p["family"] == name]
        if not pts:
            continue
        y = np.array([p["lds"]["mean"] for p in pts])
        se = np.array([p["lds"]["se"] or 0.0 for p in pts])
        for ax, key in zip(axes, ("compute_s", "trained_models")):
            xs = np.array([p[key] for p in pts], float)
            ax.errorbar(xs, y, yerr=1.96 * se, marker="o", ms=4, capsize=2, color=color, label=name)
        fit = (doc.get("fits") or {}).get(name)
        if fit and fit.get("fitted"):
            f, keys = CURVES[fit["curve"]]
            p = fit["fits"][fit["curve"]]["params"]
            ends = [e["members"] for e in fit["extrapolation"].values() if e["members"]]
            top = max([max(pt["members"] for pt in pts) * 4, FRONTIER_EXTRAPOLATE_TO if not ends else 0, *ends])
            n = np.geomspace(max(pt["members"] for pt in pts), top, 60)
            curve = f(n, *[p[k] for k in keys])
            # trained models = members for zoo families; a checkpoint family trains one model whatever its members
            per_model = pts[-1]["trained_models"] / pts[-1]["members"]
            if per_model == 1:
                axes[1].plot(n, curve, "--", color=color, lw=1)
            axes[0].plot(fit["compute_fixed_s"] + fit["compute_per_member_s"] * n, curve, "--", color=color, lw=1)
    for ax, xlabel in zip(axes, ("total compute (s): fit + score + training of the extra models",
                                 "trained models (zoo models explained; datamodels: subset models)")):
        ax.set_xscale("log")
        if ceiling:
            ax.axhline(ceiling, color="k", lw=1.2, label=f"noise ceiling {ceiling:.3f}")
            ax.axhline(TARGET_OF_CEILING * ceiling, color="k", lw=0.8, ls=":",
                       label=f"{TARGET_OF_CEILING} × ceiling")
        ax.axhline(TARGET_LDS, color="grey", lw=0.8, ls="-.", label=f"LDS {TARGET_LDS}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("LDS (reported queries, ±1.96 se)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{doc['setting']}: the cost–quality frontier (dashed: fitted curve, extrapolated)")
    return _save(fig, out, dpi=110)


def gap_study(rec: dict, out: Path, paper_lds: float | None = None) -> Path:
    """The gap study (:mod:`benchmark.studies.gap`) as a dot plot: each factor level's validation LDS with its 95%
    interval, its noise ceiling where one applies, and the paper's Table 1 value."""
    plt = _plt()

    rows = list(rec["rows"]) + grid_rows(rec)
    labels = [f"{r['factor']}: {r['level']}" for r in rows]
    y = np.arange(len(rows))[::-1]
    height = 1.4 + 0.32 * len(rows)
    fig, ax = plt.subplots(figsize=(8.5, height))
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    colours = plt.get_cmap("tab10")
    for yi, r in zip(y, rows):
        c = colours(factors.index(r["factor"]) % 10)
        ax.errorbar(r["lds"], yi, xerr=1.96 * r["lds_se"], fmt="o", color=c, capsize=3, ms=5)
        if r.get("ceiling") is not None:
            ax.plot(r["ceiling"], yi, marker="|", ms=12, mew=2, color="grey")
    paper = paper_lds
    if paper is not None:
        ax.axvline(paper, color="crimson", ls="--", lw=1.2, label=f"paper (Table 1, reported queries) {paper:.2f}")
    ax.plot([], [], marker="|", ls="none", ms=12, mew=2, color="grey", label="noise ceiling of that target")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(f"LDS on {rec['queries']} validation queries (mean, 95% CI)")
    # wrapped narrow: the long factor labels leave the axis (and its centred title) little width
    ax.set_title(textwrap.fill(f"{rec['setting']} / {rec['solver']}: what moves LDS (baseline: 1 model, "
                               f"{len(rec['replicas'])} replicas, margin; {rec['params_source']})", 55), fontsize=9)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # room for the legend under the axis
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def ihvp_error(df, lissa, path: Path) -> Path:
    plt = _plt()
    import seaborn as sns

    names = list(dict.fromkeys(df["setting"]))
    labels = [x for x in dict.fromkeys(df["solver"]) if x != "exact"]  # exact is the reference
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    fig, axes = plt.subplots(len(names), 4, figsize=(22, 5.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        d = df[df["setting"] == name]
        ax = axes[i, 0]
        for label in labels:
            s = d[d["solver"] == label]
            ax.errorbar(s["damping"], s["rel_error"], yerr=s["rel_error_se"], marker="o", label=label,
                        color=palette[label], ls="--" if label == "identity" else "-", capsize=2)
        ax.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="‖r − r*‖ / ‖r*‖",
               title=f"{name}: IHVP relative error vs exact (identity at scale 1/λ)")
        ax.legend(fontsize=8)
        ax = axes[i, 1]
        for label in labels:
            s = d[d["solver"] == label]
            ax.errorbar(s["damping"], s["score_spearman"], yerr=s["score_spearman_se"], marker="o", label=label,
                        color=palette[label], ls="--" if label == "identity" else "-", capsize=2)
        ax.set(xscale="log", xlabel="damping λ", ylabel="Spearman vs exact-inverse scores (mean ± s.e.)",
               title=f"{name}: agreement of influence scores with exact", ylim=(min(0.0, float(d["score_spearman"].min())), 1.02))
        ax.legend(fontsize=8)
        ax = axes[i, 2]
        ls = lissa[lissa["setting"] == name]
        colors = sns.color_palette("viridis", ls["damping"].nunique())
        for c, (lam, s) in zip(colors, ls.groupby("damping")):
            ax.plot(s["depth"], s["rel_error"], marker="o", color=c, label=f"λ={lam:g} measured")
            ax.plot(s["depth"], s["bound_rel"].clip(1e-9, 1e4), ls="--", color=c, label=f"λ={lam:g} §6.1 bound")
        ax.set(xscale="log", yscale="log", xlabel="LiSSA depth J", ylabel="relative error (bound clipped to [1e-9, 1e4])",
               ylim=(1e-9, 2e4),
               title=f"{name}: LiSSA error vs depth (batch {int(ls['batch_size'].iloc[0]) if len(ls) else '?'})")
        if len(ls):  # a study without LiSSA rows leaves this panel empty
            ax.legend(fontsize=7, ncol=2)
        ax = axes[i, 3]
        for label in [x for x in labels if x.startswith(("ekfac", "kfac"))]:
            s = d[d["solver"] == label]
            ax.plot(s["damping"], s["rel_error"], marker="o", color=palette[label], label=f"{label} measured")
            ax.plot(s["damping"], s["bound_rel"], marker="x", ls="--", color=palette[label], label=f"{label} §6.2 bound")
        ax.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="relative error",
               title=f"{name}: K-FAC / EK-FAC beside the §6.2 bound\n(sorted spectra; it assumes shared eigenvectors)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def influence_grid(data, items: list[dict], out: Path, title_extra: str = "") -> Path:
    """Rows: query × solver; columns: the query, its most helpful and most harmful training images.
    ``items``: the ``influential`` sections of the qualitative study, one per solver."""
    plt = _plt()
    rows = [(q, item) for qi in range(len(items[0]["queries"])) for item in items for q in [item["queries"][qi]]]
    top = len(items[0]["queries"][0]["positive"])
    cols = 1 + 2 * top
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.35 * cols + 0.6, 2.4 * len(rows) + 0.5), squeeze=False)
    for r, (q, item) in enumerate(rows):
        params = "\n".join(fmt_params({k: v}) for k, v in item["params"].items() if v is not None)
        _show(axes[r][0], data.test_x[q["index"]], f"test #{q['index']}, label {label_name(data, q['label'])}\n"
              f"{item['solver']}" + (f"\n{params}" if params else ""), title="query" if r == 0 else None)
        for j, p in enumerate(q["positive"]):
            _show(axes[r][1 + j], data.train_x[p["index"]], f"#{p['index']} y={label_name(data, p['label'])}\n"
                  f"τ={p['score']:+.3g}", POSITIVE, "most helpful" if (r == 0 and j == 0) else None)
        for j, p in enumerate(q["negative"]):
            _show(axes[r][1 + top + j], data.train_x[p["index"]], f"#{p['index']} y={label_name(data, p['label'])}\n"
                  f"τ={p['score']:+.3g}", NEGATIVE, "most harmful" if (r == 0 and j == 0) else None)
    sources = sorted({i["params_source"] for i in items})
    title = (f"{items[0]['setting']}: most positively (green) and negatively (red) influential training images "
             f"(τ = predicted change of the query's {items[0]['measurement']} when up-weighting the image; "
             f"hyper-parameters: {'; '.join(sources)}){title_extra}")
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 15)), fontsize=8)  # ≈ 15 characters/inch
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def self_influence_top(data, item: dict, out: Path) -> Path:
    """The top self-influence training images (the qualitative study's ``self_influence`` section)."""
    plt = _plt()
    top = item["top"]
    ncols = 5
    nrows = -(-len(top) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 2.0 * nrows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, p in enumerate(top):
        ax = axes[k // ncols][k % ncols]
        ax.axis("on")
        _show(ax, data.train_x[p["index"]], f"#{p['rank']}: idx {p['index']}\nlabel {label_name(data, p['label'])}, "
              f"model says {label_name(data, p['predicted'])}", NEGATIVE if p["predicted"] != p["label"] else None)
    fig.suptitle(f"{item['setting']}: top-{len(top)} self-influence training images ({item['solver']}, "
                 f"{fmt_params(item['params'])}; {item['params_source']})\nred frame: the explained model disagrees "
                 f"with the label", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def remove_top_k(summary: pd.DataFrame, out: Path) -> Path:
    """Remove-top-k (:mod:`benchmark.studies.counterfactual`): mean margin drop (± 1.96 se) and flip rate vs k,
    one line per solver and the random baseline."""
    plt = _plt()
    palette = solver_palette(summary["method"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, part in summary.groupby("method", sort=False):
        part = part.sort_values("k")
        style = dict(color=palette[method], marker="o", label=method, ls="--" if method in BASELINES else "-")
        axes[0].errorbar(part["k"], part["drop_mean"], yerr=1.96 * part["drop_se"], capsize=3, **style)
        axes[1].plot(part["k"], part["flip_rate"], **style)
    setting = summary["setting"].iloc[0]
    ks = sorted(summary["k"].unique())
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].set(xlabel="k training points removed", ylabel="margin drop (full − retrained), mean ± 95%",
                title=f"{setting}: removing each solver's top-k positive influences")
    axes[1].set(xlabel="k training points removed", ylabel="share of queries whose prediction flips",
                ylim=(-0.02, 1.02), title=f"{setting}: flip rate (seed-matched retraining)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, tight=False)


RULE_TITLES = {"random": "remove random points", "self-influence": "remove the top self-influence points",
               "flipped": "remove flipped-label points", "repair": "repair flipped labels"}


def unlearning(summary: pd.DataFrame, meta: dict, out: Path) -> Path:
    """Newton unlearning (:mod:`benchmark.studies.unlearning`) per forget-set rule: the parameter distance ratio to
    the seed-matched retrained model, the accuracy on the forget set under its true labels, and test accuracy,
    vs the forget set's size; one line per solver (derived step, damping = weight decay) beside fine-tuning,
    retraining with another seed (the noise floor) and retraining itself."""
    plt = _plt()
    from matplotlib.ticker import NullLocator

    wd = meta["weight_decay"]
    s = summary.copy()
    s["damping"] = pd.to_numeric(s["damping"], errors="coerce")
    keep = s["method"].isin(["fine-tune", "retrain (other seed)", "no update"]) | (
        (s["form"] == "derived") & (s["damping"].isna() | np.isclose(s["damping"].fillna(-1), wd)))
    s = s[keep]
    rules = [r for r in ("random", "self-influence", "flipped", "repair") if r in set(s["rule"])]
    methods = list(dict.fromkeys(s["method"]))
    palette = solver_palette([m for m in methods if m not in ("fine-tune", "retrain (other seed)", "no update")])
    palette.update({"fine-tune": (0.55, 0.35, 0.15), "retrain (other seed)": (0.6, 0.6, 0.6),
                    "no update": (0.1, 0.1, 0.1)})
    panels = [("distance_ratio", "‖θ_new − θ_retrain‖ / ‖θ − θ_retrain‖", True),
              ("forget_accuracy", "accuracy on the forget set (true labels)", False),
              ("test_accuracy", "test accuracy", False)]
    fig, axes = plt.subplots(len(panels), len(rules), figsize=(4.2 * len(rules), 3.3 * len(panels)), squeeze=False)
    for c, rule in enumerate(rules):
        part = s[s["rule"] == rule]
        for r, (col, label, log) in enumerate(panels):
            ax = axes[r][c]
            for method in methods:
                m = part[part["method"] == method].sort_values("fraction")
                if len(m):
                    ax.plot(m["fraction"], m[col], marker="o", color=palette[method], label=method,
                            ls="--" if method in ("retrain (other seed)", "no update") else "-")
            if col != "distance_ratio":
                ret = part.drop_duplicates("fraction").sort_values("fraction")
                ax.plot(ret["fraction"], ret[f"retrain_{col}"], marker="s", color="crimson", ls=":",
                        label="retrain (same seed)")
            ax.set(xscale="log", yscale="log" if log else "linear", xlabel="forget-set size (% of the training set)",
                   ylabel=label)
            sizes = sorted(part["fraction"].unique())
            ax.set_xticks(sizes, [f"{100 * f:.2g}" for f in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            if r == 0:
                ax.set_title(f"{meta['setting']}: " + RULE_TITLES[rule], fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{meta['setting']}: one Newton step (damping = weight decay {wd:g}) vs retraining; "
                 f"{meta['explained']}; mean over seeds {meta['seeds']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, out, tight=False)
