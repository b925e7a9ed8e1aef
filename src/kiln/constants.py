"""Constants every layer shares (a leaf)."""

IGNORE_INDEX = -100  # label positions the losses skip: PyTorch's and Hugging Face's convention
