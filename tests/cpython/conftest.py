"""``run_suites.py`` runs CPython's tests under unittest by itself: pytest skips this folder."""

collect_ignore_glob = ["*"]
