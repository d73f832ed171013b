"""Using a trained checkpoint: one module per kind of model.

- ``gpt``: load a GPT checkpoint, sample from it, score a token stream (``eval``,
  ``sample``, ``export``).
"""
