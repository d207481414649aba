"""`python -m orchestrator ...` is the same as the `foresight` console script."""

from orchestrator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
