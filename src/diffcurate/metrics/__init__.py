"""Measurements behind the hygiene run's decisions: pure numpy/scipy/fairlearn, no storage.

- :mod:`~diffcurate.metrics.audit`: is a removal set fair across group attributes?
- :mod:`~diffcurate.metrics.memorization`: how many secret images does a model reproduce (Mem%)?
- :mod:`~diffcurate.metrics.utility`: did pruning cost image quality (Fréchet distance, KID)?
- :mod:`~diffcurate.metrics.lds`: does an attribution method predict retraining outcomes
  (Linear Datamodelling Score, seed 001)?

Flows and tasks call these functions and write their results to the ledger; nothing here reads or
writes LanceDB or DuckDB, so every number can be recomputed in a test.
"""
