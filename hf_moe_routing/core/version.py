"""The package version (one place; ``hf_moe_routing.__version__`` re-exports it), and the versions of the
packages that shape trained weights."""

import platform
from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

#: Distributions whose behaviour decides the bytes of a trained model: the maths (torch, numpy), the model code
#: (transformers), the tokenizer trainer (tokenizers), data loading and shuffling (datasets), and the training
#: loop's device and precision handling (accelerate).
SHAPING_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "numpy", "accelerate")


def shaping_versions() -> dict[str, str | None]:
    """The installed versions of the packages that shape trained weights, and of Python.

    Returns:
        ``{"torch": "2.13.0+cpu", "transformers": "5.25.0", "tokenizers": ..., "datasets": ..., "numpy": ...,
        "accelerate": ..., "python": "3.11.9"}``: version strings as the installed distributions' metadata gives
        them (``None`` for a package that is not installed). Two builds whose dictionaries differ may differ in
        their weights. Read from package metadata, so nothing is imported.
    """
    found: dict[str, str | None] = {}
    for name in SHAPING_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found
