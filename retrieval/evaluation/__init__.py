"""Evaluation: benchmarks (which images are queries and database), the harness that extracts, caches and
ranks every method on one, the ranking and localisation metrics (and their slow reference versions), the
processes sharing one evaluation, contact sheets of results, and the catalogue of every method by name. The
top of ``retrieval``: it may use the baselines, which are methods like any other."""
