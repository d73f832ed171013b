"""Config sections of the non-GPT workloads, one module per family so each owns its keys;
importing this registers them all in the one schema."""

from hpcps.config import fields_embed_rnn, fields_transformers  # noqa: F401
