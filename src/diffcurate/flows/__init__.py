"""Prefect flows: numbered steps composed from tasks, with pydantic parameters."""
