"""The review web app: flagged images, audits, gates, reviewer marks and release decisions.

It reads through :mod:`diffcurate.storage` and writes only ledger records: reviewer marks
(:mod:`diffcurate.storage.reviews`) and approve/reject decisions through
:mod:`diffcurate.curation.approval`, the service ``diffcurate release approve|reject`` calls.
Start it with ``diffcurate serve``; create users with ``diffcurate users add``.
"""
