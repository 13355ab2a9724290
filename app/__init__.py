"""HTTP inference service for a multi-token-prediction transformer."""

__version__ = "0.1.0"
