"""Pure modules shared by the driver (orchestrator/) and the actors (actors/): the config schema,
losses, extrapolation, geometry, models, tasks and data, the sandbox, the scale registry and cost
model, methods. They import nothing from orchestrator/ or actors/ (tests/test_imports.py)."""
