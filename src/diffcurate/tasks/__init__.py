"""Prefect tasks: thin wrappers that add retries/caching policy to plain functions."""
