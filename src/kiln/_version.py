"""The version, in a leaf module: checkpoints record it without importing the package's face."""

__version__ = "0.1.0"
