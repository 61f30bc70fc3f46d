"""Models loaded from local paths: open_clip embedders and diffusers denoisers; training and
sampling of reference diffusion models."""
