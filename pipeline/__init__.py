"""prerouter: train a compact pre-generation LLM router and ship it as an ONNX bundle."""
__version__ = "0.1.0"
