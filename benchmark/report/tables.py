"""Floor 6: the tables a person reads in the terminal — Table 1 (recomputed or committed), mislabel detection,
the gap study — formatted from results, never computing them.
"""

from __future__ import annotations

import math

from ..studies.gap import STUDY_NOTE, grid_rows
from .leaderboard import RECALL_KEYS, fmt_params

# Reference measurements quoted beside our numbers (docs/results.md, "Reference figures"): Kronfluence 1.0.1's
# EK-FAC on the same MNIST CNN recipe, 10% labels flipped, one model.
PEER_MISLABEL = {"mnist-cnn": {"source": "Kronfluence 1.0.1 EK-FAC, docs/results.md", "ekfac": {"recall_10": 0.91},
                               "baseline-loss": {"recall_10": 0.99}}}


def _lds_cells(lds: dict) -> str:
    if lds.get("mean") is None:
        return f"{'undefined':>16s} {'':>17s}"
    return f"{lds['mean']:>8.3f} ± {lds['se']:.3f} [{lds['ci_low']:.3f}, {lds['ci_high']:.3f}]"


def _header() -> str:
    return (f"{'':24s} {'LDS ± se':>16s} {'95% CI':>17s} {'noise ceiling':>13s} {'of ceiling':>10s} {'paper':>6s}  "
            f"params")


def _line(label: str, lds: dict, paper: float | None) -> str:
    ceiling = "n/a (1 seed)" if lds.get("ceiling") is None else f"{lds['ceiling']:.3f}"
    frac = "" if lds.get("of_ceiling") is None else f"{lds['of_ceiling']:.2f}"
    return (f"{label:24s} {_lds_cells(lds)} {ceiling:>13s} {frac:>10s} "
            f"{'—' if paper is None else f'{paper:.2f}':>6s}  {fmt_params(lds.get('params'))}")


def _paper_line(paper: float) -> str:
    """The paper's row: its one published LDS in the LDS column (it reports no se, interval or ceiling)."""
    return (f"{'paper (Zhu & Cangelosi)':24s} {paper:>8.2f} {'(no se)':>7s} {'':>17s} {'—':>13s} {'':>10s} "
            f"{paper:>6.2f}")


def _protocol_note(lds: dict) -> str:
    used = lds["ground_truth"]
    explained = lds.get("explained") or {"source": "ground truth", "models": list(range(lds.get("ensemble", 1)))}
    models = ", ".join(str(k) for k in explained["models"])
    source = (f"zoo models {models} (no seed shared with the target)" if explained["source"] == "zoo" else
              f"the ground truth's full-data model(s) {models} (model k shares its seed with replica k)")
    note = (f"LDS: Spearman over {lds['subsets']} subsets, mean over {lds['queries']} queries, measurement "
            f"{lds['measurement']}, target = mean of replicas {used['replicas']}; explained: {source}; "
            f"hyper-parameters chosen on validation queries. Ground truth {used['path']} (root hash "
            f"{used['root_hash'][:12]}…).")
    if not used["complete"]:
        note += (f"\n* evaluated on an INCOMPLETE ground truth ({used['units_done']}/{used['units_total']} units): "
                 f"the paper comparison is provisional")
    return note


def table1_recomputed(setting, result: dict) -> str:
    """The recomputed Table 1 row beside the committed record and the paper, with the verdict."""
    new, old, cmp = result["recomputed"], result["committed"], result["comparison"]
    st = result["stages"]
    lines = [f"Table 1, {setting.name} ({setting.description}), {result['solver']}: RECOMPUTED from the committed "
             f"ground truth", _header(), _line("recomputed now", new, setting.paper_lds)]
    if old:
        lines.append(_line("committed record", old, setting.paper_lds))
    if setting.paper_lds is not None:
        lines.append(_paper_line(setting.paper_lds))
    lines.append(_protocol_note(new))
    if cmp:
        if cmp["difference"] is None:
            lines.append("comparison: undefined (an LDS is undefined)")
        else:
            lines.append(f"recomputed − committed: {cmp['difference']:+.4f} (paired over the same queries: "
                         f"{cmp['paired_difference']:+.4f} ± {cmp['paired_difference_se']:.4f}, largest per-query "
                         f"difference {cmp['max_query_difference']:.4f}) -> "
                         + ("AGREE within the committed standard error" if cmp["agree"] else
                            f"DISAGREE: the difference exceeds the committed standard error {cmp['tolerance']:.4f}"))
    else:
        lines.append("no committed record to compare with")
    lines.append(f"stages: verify {st['verify_s']:.0f} s, fit {st['fit_s'] or 0:.0f} s, validation grid "
                 f"{(st['search_s'] or 0):.0f} s (fits included), reported scores {st['score_s'] or 0:.0f} s; total "
                 f"{st['total_s']:.0f} s; peak memory {st['peak_mb'] or 0:.0f} MB")
    return "\n".join(line for line in lines if line)


def table1_committed(setting, rows: list[dict], gap_rows: list[dict]) -> str:
    """The committed records, as committed: each marked current or STALE (with why), never recomputed."""
    lines = [f"Table 1, {setting.name} ({setting.description}): the COMMITTED run records, displayed without "
             f"recomputing (`make lds-mnist` recomputes)", _header()]
    notes = []
    for r in rows:
        if r["record"] is None:
            lines.append(f"{r['name']:24s} no committed record")
            continue
        lds = r["record"]["lds"]
        if r["stale"].get("lds"):
            lines.append(f"{r['name']:24s} STALE, not shown: {'; '.join(r['stale']['lds'])}")
            continue
        lines.append(_line(f"{r['name']} (current)", lds, setting.paper_lds))
        notes.append(_protocol_note(lds) + f" Record created {r['record'].get('created')}.")
    lines += notes[:1]
    for g in gap_rows:
        rep, lds = g["reported"], g["reported"]["lds"]
        if g["stale"]:
            lines.append(f"{g['name']} with the gap study's protocol ({g['path']}): STALE, not shown: "
                         + "; ".join(w for v in g["stale"].values() for w in v))
            continue
        lines.append(f"{g['name']} with the gap study's protocol ({g['path']}; chosen on validation queries): "
                     f"ensemble of {rep['ensemble']} model(s), measurement {rep['measurement']}, "
                     f"{fmt_params(rep['params'])}: LDS {lds['mean']:.3f} ± {lds['se']:.3f} [{lds['ci_low']:.3f}, "
                     f"{lds['ci_high']:.3f}]" + ("" if lds.get("of_ceiling") is None else
                                                f", {lds['of_ceiling']:.2f} of the ceiling"))
    return "\n".join(lines)


def mislabel_table(setting, manifest: dict, rows: list, spec) -> str:
    """Recall at 10-50% inspected and AUC per ranking, saying plainly which ranking wins."""
    m0 = manifest["models"][0]
    lines = [f"Mislabel detection, {setting.name}: {manifest['corruption']['flipped']} of {rows[0][1]['n']} training "
             f"labels flipped (seed {spec.seed}); artifact {manifest['setting']}/{manifest['version']}; corrupted-label "
             f"model test accuracy {m0['test_accuracy']:.4f}, it fits {m0['flipped_fit_to_noisy_label']:.1%} of the "
             f"flipped labels",
             f"{'ranking':26s} " + " ".join(f"{'@' + str(p) + '%':>13s}" for p in (10, 20, 30, 40, 50))
             + f" {'AUC':>13s}"]
    for name, m in rows:
        label = {"baseline-random": "random order (expected)", "baseline-loss": "training loss"}.get(
            name, f"{name} self-influence")
        cells = [f"{m[k]:.3f} ± {m[k + '_se']:.3f}" for k in RECALL_KEYS] + [f"{m['auc']:.3f} ± {m['auc_se']:.3f}"]
        lines.append(f"{label:26s} " + " ".join(f"{c:>13s}" for c in cells))
    loss = dict(rows)["baseline-loss"]
    for name, m in rows:
        if name.startswith("baseline-"):
            continue
        diff = m["recall_10"] - loss["recall_10"]
        se = math.hypot(m["recall_10_se"], loss["recall_10_se"])
        verdict = ("self-influence wins" if diff > 2 * se else "training loss wins" if diff < -2 * se
                   else "no clear winner (within 2 se)")
        lines.append(f"{name}: recall@10% {m['recall_10']:.3f} vs training loss {loss['recall_10']:.3f} -> {verdict}; "
                     f"AUC {m['auc']:.3f} vs {loss['auc']:.3f}")
    peer = PEER_MISLABEL.get(setting.name)
    if peer:
        lines.append(f"reference ({peer['source']}): recall@10% EK-FAC {peer['ekfac']['recall_10']:.2f}, "
                     f"training loss {peer['baseline-loss']['recall_10']:.2f}")
    return "\n".join(lines)


def gap_table(rec: dict) -> str:
    """The study as a Markdown table (what README quotes)."""
    lines = [f"Gap study, {rec['setting']} / {rec['solver']} {rec['params']} ({rec['params_source']}); "
             f"{rec['queries']} validation queries, M={rec['subsets']}. Δ: paired difference to the baseline "
             f"(1 model, {len(rec['replicas'])} replicas, margin/margin).",
             "", "| factor | level | LDS ± se | Δ ± se | noise ceiling |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        ceil = "" if r["ceiling"] is None else f"{r['ceiling']:.3f}"
        mark = "†" if r.get("note") == STUDY_NOTE else ""
        lines.append(f"| {r['factor']} | {r['level']} | {r['lds']:.3f} ± {r['lds_se']:.3f} | "
                     f"{r['delta']:+.3f} ± {r['delta_se']:.3f}{mark} | {ceil} |")
    for d in grid_rows(rec):
        lines.append(f"| {d['factor']} | {d['level']} | {d['lds']:.3f} ± {d['lds_se']:.3f} | | |")
    if any(r.get("note") == STUDY_NOTE for r in rec["rows"]):
        lines += ["", f"† {STUDY_NOTE}; each artifact's first full-data model is explained with the same "
                      f"hyper-parameters."]
    if rec.get("reported"):
        r, lds = rec["reported"], rec["reported"]["lds"]
        ceil = "" if lds.get("ceiling") is None else f"; noise ceiling {lds['ceiling']:.3f} ({lds['of_ceiling']:.2f} of it)"
        lines += ["", f"Chosen on validation ({r['rule']}): {r['params']}, ensemble of {r['ensemble']}, "
                      f"measurement {r['measurement']}. On the {r['queries']} reported queries: LDS {lds['mean']:.3f} ± "
                      f"{lds['se']:.3f} [{lds['ci_low']:.3f}, {lds['ci_high']:.3f}]{ceil}."]
    return "\n".join(lines)


def reproduce_table(rep: dict) -> str:
    """Retrained ground-truth units beside the committed ones and the seed-noise yardstick, with the verdicts."""
    o = rep["overall"]
    lines = [f"Reproducing {rep['setting']} ground truth {rep['artifact']} (root hash {rep['root_hash'][:12]}…): "
             f"{o['units']} unit(s) retrained from their recorded seeds on {rep['device']} ({rep['executor']})",
             "query margins (reported + validation columns), retrain vs committed unit | the same between two seeds of "
             "the same subset, from the artifact (mean over its pairs) | the retrain's fraction of that seed noise",
             f"{'unit':10s} {'seconds':>7s} {'bitwise':>9s} {'Pearson':>8s} {'Spearman':>8s} {'mean|Δ|':>8s} "
             f"{'max|Δ|':>7s} | {'Pearson':>8s} {'Spearman':>8s} {'mean|Δ|':>8s} | {'|Δ|':>5s} {'1-r':>5s} | "
             f"{'query acc.':>15s}  verdict"]

    def row(label, seconds, bitwise, s, y, f, acc, verdict):
        return (f"{label:10s} {seconds:>7s} {bitwise:>9s} {s['pearson']:>8.4f} {s['spearman']:>8.4f} "
                f"{s['mean_abs_diff']:>8.4f} {s['max_abs_diff']:>7.3f} | {y['pearson']:>8.4f} {y['spearman']:>8.4f} "
                f"{y['mean_abs_diff']:>8.4f} | {f['mean_abs_diff']:>5.2f} {f['disagreement']:>5.2f} | {acc:>15s}  {verdict}")

    for u in rep["units"]:
        acc = u["query_accuracy"]
        lines.append(row(u["unit"], f"{u['seconds']:.3g}", "identical" if u["identical"] else "differs", u,
                         u["yardstick"], u["fraction_of_yardstick"],
                         f"{acc['committed']:.4f}→{acc['retrained']:.4f}", u["verdict"]))
    counts = ", ".join(f"{n} {v}" for v, n in o["verdicts"].items() if n)
    lines.append(row("mean", f"{o['seconds'] / max(o['units'], 1):.3g}", f"{o['identical']}/{o['units']}", o,
                     o["yardstick"], o["fraction_of_yardstick"], "", ""))
    for u in rep["units"]:
        if u["test_accuracy"] is not None:
            t = u["test_accuracy"]
            lines.append(f"{u['unit']}: weights {'identical' if u['weights_identical'] else 'differ'}"
                         + ("" if u["max_weight_diff"] is None else f" (max |Δw| {u['max_weight_diff']:.3g})")
                         + f"; full test accuracy {t['committed']:.4f} committed, {t['retrained']:.4f} retrained")
    committed = sorted({u["committed_hardware"] for u in rep["units"]})
    here = sorted({u["hardware"] for u in rep["units"]})
    lines += [f"committed units trained on: {' | '.join(committed)}", f"retrains trained on: {' | '.join(here)}",
              f"rule: {rep['rule']}"]
    if rep.get("note"):
        lines.append(f"note: {rep['note']}")
    lines.append(f"verdict: {o['verdict'].upper()} ({counts}; {o['seconds']:.3g} s of training in all)")
    return "\n".join(lines)


def remove_top_k_table(summary, meta: dict) -> str:
    """Remove-top-k per method and k: mean margin drop ± se, flip rate, and the median smallest flipping k."""
    lines = [f"remove-top-k, {meta['setting']}: {len(meta['queries'])} queries x seeds {meta['seeds']} (seed 0: the "
             f"explained model's); drop = margin(full-data model) − margin(retrained), seed-matched",
             f"{'method':18s} {'k':>5s} {'pairs':>5s} {'margin drop ± se':>18s} {'flip rate':>9s} {'median min k':>12s}"]
    for _, r in summary.iterrows():
        lines.append(f"{r['method']:18s} {int(r['k']):>5d} {int(r['pairs']):>5d} "
                     f"{r['drop_mean']:>9.3f} ± {r['drop_se']:<6.3f} {r['flip_rate']:>9.2f} {r['min_k_median']:>12g}")
    art = meta["artifact"]
    lines.append(f"retrained models: {art['path']} ({'complete' if art['complete'] else 'INCOMPLETE: rerun to continue'})")
    return "\n".join(lines)


def unlearning_table(summary, meta: dict) -> str:
    """Newton removal / repair against retraining: mean over seeds per rule, size and update."""
    lines = [f"unlearning, {meta['setting']}: {meta['explained']}; seeds {meta['seeds']}; metrics against the model "
             f"retrained with the same seed (distance ratio 1 = no better than not updating)",
             f"{'rule':15s} {'m':>5s} {'update':22s} {'form':8s} {'λ':>7s} {'dist ratio':>10s} {'test acc':>8s} "
             f"{'agree':>6s} {'Δmargin ρ':>9s} {'forget acc':>10s} {'update s':>8s}"]
    for _, r in summary.iterrows():
        lam = "" if r["damping"] in ("", None) or (isinstance(r["damping"], float) and math.isnan(r["damping"])) \
            else f"{float(r['damping']):g}"
        rho = "" if math.isnan(r["change_spearman"]) else f"{r['change_spearman']:.3f}"
        lines.append(f"{r['rule']:15s} {int(r['size']):>5d} {r['method']:22s} {str(r['form'] or ''):8s} {lam:>7s} "
                     f"{r['distance_ratio']:>10.3f} {r['test_accuracy']:>8.4f} {r['agreement']:>6.3f} {rho:>9s} "
                     f"{r['forget_accuracy']:>10.3f} {r['update_s']:>8.2f}")
    art = meta["artifact"]
    lines.append(f"retrained models: {art['path']} ({'complete' if art['complete'] else 'INCOMPLETE: rerun to continue'})")
    return "\n".join(lines)


def compare_table(setting, items: list[dict]) -> str:
    """`tdabench compare`: each row's LDS and its paired difference from the first row's, query by query."""
    first = items[0]["row"]
    lines = [f"{setting.name}: LDS, and the paired difference from {first} over the queries both define "
             f"(± its standard error; 'wins': share of queries where the row beats {first})", "",
             f"{'row':<22} {'explained':<10} {'LDS ± se':<16} {'− ' + first:<22} {'queries':>7} {'wins':>5}"]
    for it in items:
        lds = f"{it['lds']:.4f} ± {it['se']:.4f}"
        row = it["row"] + (" STALE" if it["stale"] else "")
        if it["row"] == first:
            diff, n, wins = "(reference)", "", ""
        elif not it["paired"]:
            diff, n, wins = "not paired", "", ""
        else:
            diff, n, wins = f"{it['difference']:+.4f} ± {it['difference_se']:.4f}", str(it["n"]), f"{it['wins']:.2f}"
        lines.append(f"{row:<22} {it['explained']:<10} {lds:<16} {diff:<22} {n:>7} {wins:>5}")
    for it in items:
        if it["stale"]:  # the one staleness rule (records.stale_reasons), as table1 and the leaderboard apply it
            lines.append(f"  {it['row']} is STALE, its numbers are not current: {'; '.join(it['stale'])}")
    for it in items:
        if not it["paired"]:
            lines.append(f"  {it['row']} is not paired with {first}: {'; '.join(it['unpaired_reasons'])}")
    return "\n".join(lines)
