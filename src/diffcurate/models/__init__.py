"""Models loaded from local paths: open_clip embedders (and, later, diffusers pipelines)."""
