"""Corpus ingestion: read sources, decode and hash images, validate, deduplicate.

No Prefect imports here: every step is a plain function that unit tests call directly, and the
Prefect tasks in :mod:`diffcurate.tasks.ingest` are thin wrappers around them.
"""
