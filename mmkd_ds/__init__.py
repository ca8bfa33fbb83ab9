"""mmkd-ds: Multi-level Multilingual Knowledge Distillation on DeepSpeed."""

__version__ = "0.1.0"
