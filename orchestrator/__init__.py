"""Foresight: on-policy distillation (OPD) and EffOPD on Ray, DeepSpeed ZeRO-3 and MLflow."""

__version__ = "0.1.0"
