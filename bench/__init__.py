"""bench: a benchmark harness for robust self-supervised pretraining."""

__version__ = "0.1.0"
