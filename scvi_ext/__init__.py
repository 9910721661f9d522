"""scvi-tools plugin models for single-cell classification and annotation transfer."""

from importlib.metadata import PackageNotFoundError, version

from scvi_ext import data, metrics, model

try:
    __version__ = version("scvi-ext")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__", "data", "metrics", "model"]
