"""Admission-control gateway: a reverse proxy that enforces per-key rates and concurrency slots."""

__version__ = "0.1.0"
