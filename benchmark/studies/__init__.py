"""Floor 5 — studies built on evaluations, each returning data (figures and tables are drawn by ``report``):
Table 1 recomputed or committed, the gap study, IHVP error against the exact inverse, mislabel detection
studies, the qualitative influence examples, the CI regression check, and the cost benchmarks."""
