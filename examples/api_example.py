import tdabench

bench = tdabench.load("mnist-lr")  # verified ground truth, the leaderboard's explained model, train/query data
EKFAC = tdabench.solver("ekfac")


def my_method(model, train, queries, damping):
    """Stand-in for your method: (Q, N) scores, > 0 where training point i helps query q. Here: the project's EK-FAC."""
    solver = EKFAC(damping=damping, damping_mode="relative", pseudo_labels="all").fit(bench.task(model, train))
    return solver.scores(queries.x, queries.y, train.x, train.y)


# Tune on the validation queries only, then score the reported queries once.
tuning = {d: bench.evaluate_validation(my_method(bench.model, bench.train, bench.queries.validation, d))
          for d in (0.1, 1.0)}
best = max(tuning, key=lambda d: tuning[d].mean)
result = bench.evaluate(my_method(bench.model, bench.train, bench.queries.reported, best))
print(result)                          # LDS ± se, 95% CI, noise ceiling, fraction of it; result.per_query
print(bench.compare(result, "ekfac"))  # paired query by query with the leaderboard's EK-FAC row

# Self-influence on the corrupted-label model: recall of the flipped labels at 10-50% inspected, and AUC.
mislabeled = bench.mislabel
solver = EKFAC(damping=best, damping_mode="relative", pseudo_labels="all").fit(mislabeled.task())
print(bench.evaluate_mislabel(solver.self_scores(mislabeled.train.x, mislabeled.train.y)))


class GradientDot(tdabench.Solver):  # a solver defined right here, no file in solvers/
    name = "my-gradient-dot"

    def ihvp(self, vectors):  # (G + λI)⁻¹v ≈ v: no curvature
        return vectors


run = bench.run(GradientDot)  # through the leaderboard's engine: tuning, LDS, mislabel detection
print(run)
print(bench.compare(run, "identity"))  # the leaderboard's gradient dot product
