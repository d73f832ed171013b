"""The one configuration schema: it drives TOML loading, ``key=value`` overrides,
validation, the resolved-config file and docs/configuration.md.

Every key is ``section.name`` (top-level keys have an empty section). A field has
a kind (int, float, str, bool), a default, a one-line help, and optional
choices / numeric bounds. Workload-specific sections are registered from
``hpcps.config.workload_fields`` so this file stays the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

AUTO = "auto"


@dataclass(frozen=True)
class Field:
    key: str                      # "train.lr" or "out_dir"
    kind: str                     # "int" | "float" | "str" | "bool" | "int_or_auto"
    default: Any
    help: str
    choices: Optional[tuple] = None
    min: Optional[float] = None   # inclusive lower bound
    max: Optional[float] = None   # inclusive upper bound
    min_exclusive: bool = False   # True: value must be > min
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error text or None

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


SECTION_HELP: dict[str, str] = {}
FIELDS: dict[str, Field] = {}


def section(name: str, help: str) -> None:
    SECTION_HELP[name] = help


def field(key: str, kind: str, default: Any, help: str, **kw) -> None:
    if key in FIELDS:
        raise ValueError(f"config field {key} defined twice")
    FIELDS[key] = Field(key, kind, default, help, **kw)


def _straggler_check(value: str) -> Optional[str]:
    if value == "":
        return None
    for part in value.split(","):
        rank, sep, factor = part.partition(":")
        try:
            ok = sep == ":" and int(rank) >= 0 and float(factor) >= 1.0
        except ValueError:
            ok = False
        if not ok:
            return f"expected 'RANK:FACTOR[,RANK:FACTOR...]' with FACTOR >= 1, got {value!r}"
    return None


# -- top level -------------------------------------------------------------------------
section("", "Run-wide settings.")
field("out_dir", "str", "out", "Run directory: metrics.jsonl, config.toml, checkpoints/.")
field("workload", "str", "gpt", "What to train.",
      choices=("gpt", "bert", "seq2seq", "skipgram", "rnn", "synthetic"))
field("device", "str", "cpu", "Array backend: cpu (NumPy) or gpu (CuPy, one GPU per worker).",
      choices=("cpu", "gpu"))

# -- data ------------------------------------------------------------------------------
section("data", "The prepared HDF5 corpus (see docs/corpus-format.md).")
field("data.path", "str", "", "Path of the corpus written by `hpcps prepare`.")
field("data.in_memory_mb", "int", 1024,
      "Load a split into RAM when it is at most this many MB; larger splits are read from HDF5.",
      min=0)

# -- model -----------------------------------------------------------------------------
section("model", "Transformer shape (gpt, bert, seq2seq).")
field("model.n_layer", "int", 4, "Transformer blocks.", min=1)
field("model.n_head", "int", 4, "Attention heads; must divide n_embd.", min=1)
field("model.n_embd", "int", 128, "Embedding / residual width.", min=1)
field("model.block_size", "int", 64, "Context length in tokens.", min=1)
field("model.bias", "bool", False, "Biases in Linear and LayerNorm layers.")
field("model.dropout", "float", 0.0, "Dropout probability.", min=0.0, max=0.99)
field("model.tie_embeddings", "bool", True,
      "Share the token embedding with the LM head (GPT-2 style).")

# -- train -----------------------------------------------------------------------------
section("train", "Optimisation and the training loop.")
field("train.batch_size", "int", 12, "Sequences per worker per step (global batch = workers x this).",
      min=1)
field("train.max_steps", "int", 2000, "Optimizer steps to run.", min=1)
field("train.optimizer", "str", "adamw", "Optimizer run on the server shards.",
      choices=("adamw", "sgd"))
field("train.lr", "float", 1e-3, "Peak learning rate.", min=0.0, min_exclusive=True)
field("train.min_lr", "float", 1e-4, "Learning rate at the end of the cosine decay.", min=0.0)
field("train.warmup_steps", "int", 100, "Linear warm-up steps.", min=0)
field("train.lr_decay_steps", "int", 0,
      "Cosine decay length in steps (0: max_steps).", min=0)
field("train.weight_decay", "float", 0.1, "Decoupled weight decay (2-D weights only).", min=0.0)
field("train.beta1", "float", 0.9, "AdamW beta1.", min=0.0, max=0.999999)
field("train.beta2", "float", 0.99, "AdamW beta2.", min=0.0, max=0.999999)
field("train.eps", "float", 1e-8, "AdamW epsilon.", min=0.0, min_exclusive=True)
field("train.momentum", "float", 0.9, "SGD momentum.", min=0.0, max=0.999999)
field("train.grad_clip", "float", 1.0, "Global-norm gradient clipping (0: off).", min=0.0)
field("train.seed", "int", 1337, "Seed for init, data order and dropout.", min=0)
field("train.eval_every", "int", 250, "Evaluate on val every N steps (0: only at the end).", min=0)
field("train.eval_steps", "int", 20, "Batches per evaluation.", min=1)
field("train.log_every", "int", 10, "Print progress every N steps.", min=1)
field("train.resume", "str", "auto",
      "auto: newest committed checkpoint in checkpoint.dir; never; or a checkpoint path.")
field("train.peak_flops", "float", 0.0,
      "Peak FLOP/s per worker for MFU (0: measured with a matmul at start-up).", min=0.0)

# -- parameter server ------------------------------------------------------------------
section("ps", "Parameter server: roles, consistency, compression, failure detection.")
field("ps.mode", "str", "auto",
      "auto (single with 1 rank, else bsp), single, bsp, ssp, asp, allreduce.",
      choices=("auto", "single", "bsp", "ssp", "asp", "allreduce"))
field("ps.servers", "int_or_auto", AUTO,
      "Server shard ranks (auto: one per node). Must leave at least one worker.", min=1)
field("ps.staleness", "int", 2, "SSP bound: a worker at clock c waits until min clock >= c - staleness.",
      min=0)
field("ps.compression", "str", "none", "Push encoding.", choices=("none", "fp16", "bf16", "topk"))
field("ps.topk_ratio", "float", 0.01, "Fraction of elements a top-k push keeps, in (0, 1].",
      min=0.0, max=1.0, min_exclusive=True)
field("ps.error_feedback", "bool", True,
      "Keep what compression dropped on the worker and add it to the next push.")
field("ps.sparse_embedding", "bool", True,
      "Push only the embedding rows a batch touched (untied or skip-gram embeddings).")
field("ps.overlap", "bool", True, "Push each bucket as soon as backward produced it.")
field("ps.bucket_mb", "float", 1.0, "Target push bucket size in MB.", min=0.0, min_exclusive=True)
field("ps.heartbeat_timeout", "float", 30.0, "Seconds of silence before a rank is reported.",
      min=0.0, min_exclusive=True)
field("ps.dead_timeout", "float", 120.0,
      "Seconds of silence before bsp aborts naming the rank (asp/ssp drop the worker until it returns).",
      min=0.0, min_exclusive=True)
field("ps.straggler", "str", "", "Slow ranks down for experiments: 'RANK:FACTOR[,...]'.",
      check=_straggler_check)

# -- checkpoint ------------------------------------------------------------------------
section("checkpoint", "HDF5 checkpoint shards (see docs/checkpoint-format.md).")
field("checkpoint.dir", "str", "", "Checkpoint directory (empty: OUT_DIR/checkpoints).")
field("checkpoint.every", "int", 0, "Checkpoint every N steps (0: only at the end and on signals).",
      min=0)
field("checkpoint.keep", "int", 3, "Committed checkpoints to keep.", min=1)
field("checkpoint.background", "bool", True,
      "Snapshot to host memory and write in a background thread while training continues.")

# -- gpu -------------------------------------------------------------------------------
section("gpu", "GPU settings (device = gpu).")
field("gpu.compute_dtype", "str", "fp32", "Matmul precision on the GPU; master weights stay fp32.",
      choices=("fp32", "tf32", "bf16"))
field("gpu.share", "bool", False, "Allow more workers than GPUs on a node (they share devices).")

# -- synthetic -------------------------------------------------------------------------
section("synthetic", "A model-free workload with exact integer gradients (protocol tests, PS benchmarks).")
field("synthetic.n_params", "int", 1_000_000, "Elements in the flat buffer.", min=1)
field("synthetic.compute_ms", "float", 0.0, "Sleep per step, standing in for forward/backward.",
      min=0.0)

# workload sections register themselves on import
from hpcps.config import workload_fields  # noqa: E402,F401
