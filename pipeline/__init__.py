"""Offline-feature pipeline for EAGLE-1 / EAGLE-3 draft heads: extract once, train many times."""

__version__ = "0.1.0"
