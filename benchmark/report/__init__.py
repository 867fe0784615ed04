"""Floor 6 — what a person reads: the leaderboard tables, every figure, the terminal tables and the results
site. Nothing below imports this floor; it draws from results on disk and never computes a number."""
