"""Benchmarks behind ``hpcps bench``, one module per suite (``model``: training-step
throughput of the NumPy GPT vs PyTorch eager)."""
