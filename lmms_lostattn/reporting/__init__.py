"""Reading finished runs (lmms-eval and lm-eval output folders) and what is made of them: significance tests, tables,
the CI gate, the paper's tables, plots and the HTML leaderboard."""
