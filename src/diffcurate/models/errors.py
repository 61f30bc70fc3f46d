"""Errors of model loading, shared by the diffusion and text-encoder loaders."""


class ModelLoadError(Exception):
    """A model directory is missing, incomplete or inconsistent (the message says which)."""
