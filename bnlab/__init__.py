"""bnlab: batch-normalization studies with real training runs and measured reports."""

__version__ = "0.1.0"
