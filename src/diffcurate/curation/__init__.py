"""Curation decisions: which samples to remove (:mod:`.flag`) and whether a pruned candidate may
go forward for approval (:mod:`.gate`).

Pure functions over scores and measured results; the flows persist their inputs and outputs.
"""
