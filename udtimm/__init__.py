"""udtimm: multi-label classification with calibration and uncertainty distillation."""

__version__ = "0.1.0"
