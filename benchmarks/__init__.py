"""The aiotimer benchmark harness: ``python -m benchmarks --help``."""
