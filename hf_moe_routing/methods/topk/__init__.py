from .config import TopKConfig
from .layer import TopKLayer

__all__ = ["TopKConfig", "TopKLayer"]
