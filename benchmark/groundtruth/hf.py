"""Floor 3: a ground truth as a Hugging Face dataset, with a dataset card.

The folder :func:`export` writes is read by ``datasets.load_from_disk(folder)`` (a ``DatasetDict`` of four tables)
and by ``datasets.load_dataset("parquet", data_files=...)`` (the same tables as ``data/<table>.parquet``);
``README.md`` is its dataset card (protocol, recipe, checksums, the data's licence, citation). The tables:

- ``subsets``: one row per subset j: ``mask`` (N booleans: which training points S_j holds), ``size``;
- ``measurements``: one row per (subset, replica): the unit's ``seed`` and its measured ``margin``, ``loss`` and
  ``correct`` on the reported queries (``queries_*``, Q values) and on the validation queries
  (``validation_*``, V values);
- ``queries``: one row per query: ``split`` (``queries`` or ``validation``), its ``position`` in that split's
  columns, and its ``test_index`` in the setting's test set;
- ``full_models``: the K full-data models' measurements, seeds and full test-set accuracy.

The LDS target of a query is the mean over replicas of its ``queries_margin`` column, per subset — exactly
``GroundTruth.target()`` (a test rebuilds it from the folder and gets the same LDS, bit for bit).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..setup.artifacts import sha256_file, temp_dir_beside
from ..setup.config import Unit, unit_seed
from ..setup.deps import require
from ..setup.store import REPO_ROOT
from .artifact import GroundTruth
from .index import root_hash
from .protocol import OUTPUT_ROWS

TABLES = ("subsets", "measurements", "queries", "full_models")
SPLITS = ("queries", "validation")
# The data's licence, by the data spec's name: (the card's licence tag, a sentence for people).
DATA_LICENCES = {
    "mnist": ("cc-by-sa-3.0", "MNIST (Yann LeCun, Corinna Cortes, Christopher J.C. Burges) is a derivative of NIST's "
              "Special Databases 1 and 3; its copyright holders make it available under the Creative Commons "
              "Attribution-Share Alike 3.0 licence. These measurements derive from it: share them under the same "
              "terms."),
    "fashion-mnist": ("mit", "Fashion-MNIST (Han Xiao, Kashif Rasul, Roland Vollgraf; Zalando Research) is released "
                      "under the MIT licence."),
}


def default_name(gt: GroundTruth) -> str:
    return f"tdabench-{gt.setting.name}-gt-{gt.manifest['version']}-hf"


def _split_columns(prefix_rows: np.ndarray, q: int) -> dict:
    """{queries_<m>: (rows, Q), validation_<m>: (rows, V)} from (3, rows, Q+V)."""
    out = {}
    for i, m in enumerate(OUTPUT_ROWS):
        out[f"queries_{m}"] = prefix_rows[i][:, :q]
        out[f"validation_{m}"] = prefix_rows[i][:, q:]
    return out


def tables(gt: GroundTruth) -> dict[str, dict]:
    """The four tables as {column: array} (one row per array row)."""
    p, q = gt.protocol, len(gt.queries)
    r_idx, j_idx = np.meshgrid(np.arange(p.seeds), np.arange(p.subsets), indexing="ij")
    r_idx, j_idx = r_idx.ravel(), j_idx.ravel()  # replica-major: rows r*M + j
    outs = np.stack([gt.outputs[m].reshape(p.seeds * p.subsets, -1) for m in OUTPUT_ROWS])
    full = np.stack([gt.full_outputs[m] for m in OUTPUT_ROWS])
    n_q, n_v = len(gt.queries), len(gt.validation_queries)
    return {
        "subsets": {"subset": np.arange(p.subsets, dtype=np.int32), "size": gt.masks.sum(1).astype(np.int32),
                    "mask": gt.masks},
        "measurements": {"subset": j_idx.astype(np.int32), "replica": r_idx.astype(np.int32),
                         "seed": np.array([unit_seed(p, Unit(int(r), int(j))) for r, j in zip(r_idx, j_idx)],
                                          dtype=np.int64),
                         **_split_columns(outs, q)},
        "queries": {"split": np.array(["queries"] * n_q + ["validation"] * n_v),
                    "position": np.concatenate([np.arange(n_q), np.arange(n_v)]).astype(np.int32),
                    "test_index": np.concatenate([gt.queries, gt.validation_queries]).astype(np.int64)},
        "full_models": {"model": np.arange(p.full_models, dtype=np.int32),
                        "seed": np.array([unit_seed(p, Unit(k, None)) for k in range(p.full_models)], dtype=np.int64),
                        "test_accuracy": gt.full_test_accuracy.astype(np.float64), **_split_columns(full, q)},
    }


def _dataset(datasets, columns: dict):
    """A ``datasets.Dataset`` with explicit types (float32 measurements, bool masks), built through pyarrow."""
    import pyarrow as pa

    arrays = {}
    for name, a in columns.items():
        a = np.asarray(a)
        if a.ndim == 2:  # one list per row
            offsets = np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(a.ravel()))
        else:
            arrays[name] = pa.array(a.tolist() if a.dtype.kind == "U" else a)
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(arrays)))


def export(gt: GroundTruth, out_dir: Path, name: str | None = None, progress: bool = True) -> Path:
    """Write ``gt`` as a Hugging Face dataset folder ``out_dir/name`` (atomically: built beside it, then renamed
    into place; an older export of the same name is replaced only once the new one is complete)."""
    datasets = require("datasets", "exporting a ground truth as a Hugging Face dataset")
    if not gt.manifest.get("complete"):
        raise ValueError(f"{gt.root} is incomplete; only a finished ground truth is exported")
    target = Path(out_dir) / (name or default_name(gt))
    tmp = temp_dir_beside(target)
    try:
        if not progress:
            datasets.disable_progress_bars()
        dd = datasets.DatasetDict({t: _dataset(datasets, cols) for t, cols in tables(gt).items()})
        dd.save_to_disk(str(tmp))
        (tmp / "data").mkdir()
        for t in TABLES:
            dd[t].to_parquet(str(tmp / "data" / f"{t}.parquet"))
        checksums = {f"data/{t}.parquet": sha256_file(tmp / "data" / f"{t}.parquet") for t in TABLES}
        (tmp / "README.md").write_text(card(gt, checksums))
        old = None
        if target.exists():
            old = temp_dir_beside(target)
            os.rename(target, old / "old")
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _citation() -> str:
    path = REPO_ROOT / "CITATION.cff"
    if path.is_file():
        return "```yaml\n" + path.read_text().strip() + "\n```"
    return "Cite tdabench (training-data attribution benchmark) and Zhu & Cangelosi (2025), *Revisiting Data " \
           "Attribution for Influence Functions*."


def card(gt: GroundTruth, checksums: dict[str, str]) -> str:
    """The dataset card: what the tables hold, the protocol and recipe, checksums, licence and citation."""
    man, p, s = gt.manifest, gt.protocol, gt.setting
    data = man["data"]
    tag, licence = DATA_LICENCES.get(data["name"], ("other", f"The licence of the {data['name']} data is its "
                                                              f"source's; see there."))
    configs = "\n".join(f"- config_name: {t}\n  data_files: data/{t}.parquet" for t in TABLES)
    ceiling = (man.get("noise_ceiling") or {}).get(s.measurement, {})
    files = "\n".join(f"| `{n}` | `{h}` |" for n, h in sorted(data["files"].items()))
    ours = "\n".join(f"| `{n}` | `{h}` |" for n, h in checksums.items())
    extra = f" ({json.dumps(data['extra'], sort_keys=True)})" if data.get("extra") else ""
    return f"""---
license: {tag}
pretty_name: "tdabench ground truth: {s.name} ({man['version']})"
tags:
- training-data-attribution
- influence-functions
- datamodels
- linear-datamodeling-score
configs:
{configs}
---

# tdabench ground truth: `{s.name}` ({man['version']})

{s.description}. Models were trained on {p.subsets} random subsets, each holding a fraction α = {p.alpha} of the
{data['train_size']:,} training points, each subset with {p.seeds} seeds (seed policy `{p.seed_policy}`), plus
{p.full_models} models on all the data. Every model's correct-class **margin**, **loss** and **correct** are
measured on {len(gt.queries)} reported test queries and {len(gt.validation_queries)} disjoint validation queries
(for choosing hyper-parameters without touching the reported ones). This is the ground truth of the linear
datamodeling score (LDS): for query q, the Spearman correlation over subsets j between Σ_{{i∈S_j}} τ(q, i) and the
mean over seeds of the subset models' margin.

## Tables

| table | rows | columns |
|---|---|---|
| `subsets` | {p.subsets} | `subset`, `size`, `mask` ({data['train_size']} booleans: training point i is in the subset) |
| `measurements` | {p.subsets * p.seeds} | `subset`, `replica`, `seed`, `queries_margin` / `queries_loss` / `queries_correct` ({len(gt.queries)} values), `validation_margin` / `validation_loss` / `validation_correct` ({len(gt.validation_queries)} values) |
| `queries` | {len(gt.queries) + len(gt.validation_queries)} | `split` (`queries` or `validation`), `position` (column in that split's lists), `test_index` (in the test set) |
| `full_models` | {p.full_models} | `model`, `seed`, `test_accuracy`, and the measurement columns of `measurements` |

```python
import datasets, numpy as np
from scipy.stats import spearmanr
dd = datasets.load_from_disk("{default_name(gt)}")   # or load_dataset("parquet", data_files="data/<table>.parquet")
s, m = dd["subsets"].with_format("numpy")[:], dd["measurements"].with_format("numpy")[:]
masks = np.stack(s["mask"])[np.argsort(s["subset"])]                                   # (M, N) bool
order = np.lexsort((m["subset"], m["replica"]))                                        # replica-major
target = np.stack(m["queries_margin"])[order].reshape({p.seeds}, {p.subsets}, -1).mean(axis=0)  # (M, Q) LDS target
# the LDS of influence scores (Q, N), per query: Spearman over subsets of masks @ scores.T against target
pred = masks @ scores.T
lds = [spearmanr(pred[:, q], target[:, q])[0] for q in range(target.shape[1])]
```

## Protocol and recipe

Protocol: `{json.dumps(man['protocol'], sort_keys=True)}`

Training recipe (hash `{man['recipe_hash']}`): `{json.dumps(man['recipe']['train'], sort_keys=True)}`; model:
{man['recipe']['model'].get('parameters', '?'):,} parameters. Data: `{data['name']}`, {data['train_size']:,} training
and {data['test_size']:,} test points{extra}.

Noise ceiling (the LDS a perfect attribution is expected to reach against this target, {s.measurement}):
{ceiling.get('lds_ceiling', float('nan')):.4f} ± {ceiling.get('lds_ceiling_se', float('nan')):.4f}.

## Checksums

Source artifact `gt/{s.name}/{man['version']}`, root hash `{root_hash(man)}` (pinned in tdabench's
`results/index.json`; `tdabench gt {s.name} --verify` checks it). Built by code `{man.get('code_version')}`.

| data file | sha256 |
|---|---|
{files}

| this dataset's file | sha256 |
|---|---|
{ours}

## Licence

{licence} The tdabench code that produced it is MIT-licensed.

## Citation

{_citation()}
"""
