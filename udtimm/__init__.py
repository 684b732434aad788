"""udtimm: multi-label classification with calibration and uncertainty distillation."""

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> object:
    # Imported on first use: every udtimm module imports this package, and the predictor pulls in the data pipeline.
    if name == "Predictor":
        from udtimm.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'udtimm' has no attribute {name!r}")
