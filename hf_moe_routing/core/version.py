"""The package version (one place; ``hf_moe_routing.__version__`` re-exports it)."""

__version__ = "0.1.0"
