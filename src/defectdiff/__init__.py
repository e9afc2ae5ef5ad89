"""defectdiff: find and outline defects in images of parts with a diffusion model trained on good parts only."""

__version__ = "0.1.0"
