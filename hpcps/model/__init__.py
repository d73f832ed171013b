"""Models on the flat parameter buffer: ``layout`` (ParamLayout), ``layers`` and
``attention`` (forward/backward pairs on ``xp``), ``gpt`` (``GPT``)."""
