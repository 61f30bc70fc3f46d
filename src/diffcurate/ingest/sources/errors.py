"""Errors that refuse a whole source."""


class SourceError(Exception):
    """The source as a whole cannot be read; the message says why and what to do."""
