"""Compression: int8 weight-only quantization (quantize.py)."""
