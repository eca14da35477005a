"""Benchmarks: ``slaq bench engine`` and ``slaq bench transfer`` (JSON, optional PNG)."""
