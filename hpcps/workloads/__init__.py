"""Workload registry: ``build_workload(cfg, backend)`` by ``cfg.workload``."""

from __future__ import annotations

import importlib

from hpcps.errors import UserError

_MODULES = {
    "gpt": "hpcps.workloads.gpt",
    "bert": "hpcps.workloads.bert",
    "seq2seq": "hpcps.workloads.seq2seq",
    "skipgram": "hpcps.workloads.skipgram",
    "rnn": "hpcps.workloads.rnn",
    "synthetic": "hpcps.workloads.synthetic",
}


def build_workload(cfg, backend, corpus=None):
    name = cfg.workload
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name == _MODULES[name]:
            raise UserError(f"workload '{name}' is not available in this build") from None
        raise
    return module.build(cfg, backend, corpus)
