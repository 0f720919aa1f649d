"""The benchmark suite of issue 7: ``nox -s bench`` (or ``python -m bench``); see docs/benchmarks.md."""
