"""Compression: int8 weight-only quantization (quantize.py), structured pruning (prune.py), their report."""
