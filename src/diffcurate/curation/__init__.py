"""Curation decisions: which samples to remove (:mod:`.flag`), whether a pruned candidate may
go forward for approval (:mod:`.gate`), and approving or rejecting it (:mod:`.approval`).

``flag`` and ``gate`` are pure functions over scores and measured results (the flows persist
their inputs and outputs); ``approval`` is the one service both the CLI and the dashboard call
to record a decision.
"""
