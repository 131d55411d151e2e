"""The logic of the experiment binaries in examples/, as testable functions."""

__all__ = []
