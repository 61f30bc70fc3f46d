"""diffcurate: data curation for diffusion-model training sets."""

__version__ = "0.1.0"
