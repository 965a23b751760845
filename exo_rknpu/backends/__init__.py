"""Backends run slices. Each is one module with a small surface; see backends/base.py."""
