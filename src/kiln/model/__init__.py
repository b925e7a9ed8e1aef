"""The model: config (ModelConfig, presets), layers (building blocks), transformer, heads, losses, decoding."""
