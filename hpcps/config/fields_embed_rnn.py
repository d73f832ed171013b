"""Config keys of the skip-gram and RNN-classifier workloads."""

from hpcps.config.schema import field, section  # noqa: F401
