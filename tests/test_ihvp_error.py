"""The IHVP-error benchmark end to end on the tiny synthetic setting: files, columns, and numbers that must
hold (exact agrees with itself to float32 rounding, CG converges, the error metrics are in range)."""

import pandas as pd

from benchmark.evaluate import registry
from benchmark.report import figures
from benchmark.setup import settings
from benchmark.setup.store import ResultsStore
from benchmark.studies import ihvp_error


def test_ihvp_error_end_to_end(tmp_path):
    store = ResultsStore(tmp_path)
    solvers = {n: registry.get(n) for n in ("exact", "cg", "lissa", "kfac", "ekfac", "identity")}
    df, lissa = ihvp_error.run(store, [settings.get("synthetic-mlp")], solvers, dampings=[0.1], queries=12,
                               overrides={"lissa": {"depth": 20}}, log=lambda *a: None)
    out, lissa_csv = ihvp_error.csv_paths(store)
    assert pd.read_csv(out).shape == df.shape and pd.read_csv(lissa_csv).shape == lissa.shape
    for col in ("setting", "solver", "damping", "rel_error", "cosine", "score_spearman", "seconds",
                "rel_error_se", "bound_rel", "offdiag_mass", "params", "info"):
        assert col in df.columns, col
    by = df.set_index("solver")
    assert set(by.index) == {label for label, _, _ in ihvp_error.VARIANTS}
    assert by.loc["exact", "rel_error"] < 1e-6 and by.loc["exact", "score_spearman"] > 0.9999
    assert by.loc["cg", "rel_error"] < 1e-4
    assert ((df["cosine"] <= 1 + 1e-9) & (df["cosine"] >= -1)).all()
    assert (df["seconds"] >= 0).all() and (df["rel_error"] >= 0).all()
    kron = df[df["solver"].str.contains("kfac")]
    assert kron["bound_rel"].notna().all() and kron["offdiag_mass"].between(0, 1).all()
    assert sorted(lissa["depth"]) == [1, 3, 10, 20]
    assert figures.ihvp_error(df, lissa, tmp_path / "fig.png").stat().st_size > 10_000
    assert figures.ihvp_error(pd.read_csv(out), pd.read_csv(lissa_csv), tmp_path / "again.png").stat().st_size > 10_000
