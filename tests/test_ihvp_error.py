"""The IHVP-error benchmark end to end on the tiny synthetic setting: files, columns, and numbers that must
hold (exact agrees with itself to float32 rounding, CG converges, the error metrics are in range)."""

import pandas as pd

from benchmark import ihvp_error


def test_ihvp_error_end_to_end(tmp_path):
    out = tmp_path / "ihvp_error.csv"
    fig = tmp_path / "fig.png"
    ihvp_error.run(["synthetic-mlp"], dampings=[0.1], queries=12, out=out, figure=fig,
                   overrides={"lissa": {"depth": 20}}, log=lambda *a: None)
    df = pd.read_csv(out)
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
    lissa = pd.read_csv(tmp_path / "ihvp_error_lissa.csv")
    assert sorted(lissa["depth"]) == [1, 3, 10, 20]
    assert fig.stat().st_size > 10_000
    assert ihvp_error.replot(out, tmp_path / "again.png").stat().st_size > 10_000
