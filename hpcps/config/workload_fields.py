"""Config sections of the non-GPT workloads (skip-gram, BERT MLM, seq2seq, RNN classifier).

Kept apart from the core schema so each workload owns its keys; importing this
module registers them in the one schema.
"""

from hpcps.config.schema import field, section  # noqa: F401
