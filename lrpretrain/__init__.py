"""lrpretrain: config-driven pretraining of LLaMA-style models with low-rank and memory-efficient methods."""

__version__ = "0.1.0"
