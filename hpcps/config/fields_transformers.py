"""Config keys of the BERT-style MLM and seq2seq (T5-style) workloads."""

from hpcps.config.schema import field, section  # noqa: F401
