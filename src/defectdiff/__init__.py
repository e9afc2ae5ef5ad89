"""defectdiff: find and outline defects in images of parts with a diffusion model trained on good parts only."""

__version__ = "0.1.0"

from .api import Model, demo, load_model, predict, test, train

__all__ = ["Model", "demo", "load_model", "predict", "test", "train", "__version__"]
