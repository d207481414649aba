"""Comparison views over MLflow runs."""
