"""``train.init_from``: start a run from the weights of another checkpoint (fine-tuning).

The run takes three things from that checkpoint: its workload, its model shape
(the config keys below) and its parameters. Everything else starts fresh, as when
training from scratch: the optimizer state, the learning-rate schedule, the step
counter (0), the data stream and the run log. A run that resumes from its own
checkpoint (``train.resume``) continues that instead; the shape is taken all the
same, so such a run's checkpoints always fit it.

A shape key the command line sets to another value than the checkpoint's is a
contradiction: one line naming every such key (exit 2). A config file's model keys
are replaced with a note, so a config written for training from scratch still
serves for fine-tuning. A corpus whose
tokenizer (or vocabulary) differs from the one the weights were trained with
makes the token ids mean other things: one line naming both.
"""

from __future__ import annotations

import os
from typing import Optional

from hpcps.checkpoint import CheckpointReader, open_checkpoint
from hpcps.checkpoint.manifest import mismatches, short_value
from hpcps.errors import UserError

# the config keys that fix each workload's parameter layout (the rest may differ)
SHAPE_KEYS = {
    "gpt": ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
            "model.tie_embeddings"),
    "bert": ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
             "model.tie_embeddings"),
    "seq2seq": ("model.n_layer", "model.n_head", "model.n_embd", "model.bias",
                "model.tie_embeddings", "seq2seq.n_dec_layer", "seq2seq.max_src_len",
                "seq2seq.max_tgt_len", "seq2seq.share_embeddings"),
    "rnn": ("rnn.cell", "rnn.embed_dim", "rnn.hidden_size"),
    "skipgram": ("skipgram.dim",),
    "synthetic": ("synthetic.n_params",),
}
# description keys that say how token ids (or labels) are defined: a corpus must match them
VOCABULARY_KEYS = ("vocab_size", "src_vocab", "tgt_vocab", "tokenizer", "tokenizer_sha256",
                   "tokenizer_src_sha256", "tokenizer_tgt_sha256", "labels", "mask_id")
# recorded in the description for resuming, but a fine-tuning run may choose anew
TRAINING_CHOICES = ("mask_prob",)


def open_initial(cfg) -> Optional[CheckpointReader]:
    """The checkpoint ``train.init_from`` names (verified), or None without one."""
    path = cfg.train.init_from
    if not path:
        return None
    try:
        return open_checkpoint(path)
    except UserError as err:
        raise UserError(f"train.init_from: {err}") from None


def adopt_shape(cfg, initial: CheckpointReader):
    """(``cfg`` with the workload and model shape of ``initial``, notes). A shape key set on
    the command line to something else is an error listing every such key; one the config
    file sets is replaced, with a note line saying so (a config written for training from
    scratch still serves for fine-tuning)."""
    saved = initial.config
    keys = ("workload",) + SHAPE_KEYS.get(saved.workload, ())
    differ = [k for k in keys if k in cfg.given and cfg[k] != saved[k]]
    clashes = [k for k in differ if k in cfg.overridden]
    if clashes:
        them = "these keys" if len(clashes) > 1 else "it"
        raise UserError(f"train.init_from {initial.path} holds a model with "
                        f"{_settings(saved, clashes)}, but the command line sets "
                        f"{_settings(cfg, clashes)}: drop {them} (the shape comes from the "
                        f"checkpoint) or start from scratch")
    notes = []
    if differ:
        notes.append(f"hpcps: note: train.init_from {initial.path} sets "
                     f"{_settings(saved, differ)} (the config file {cfg.source} has "
                     f"{_settings(cfg, differ)})")
    return cfg.replace(**{k.replace(".", "__"): saved[k] for k in keys}), notes


def _settings(cfg, keys) -> str:
    return ", ".join(f"{k}={_text(cfg[k])}" for k in keys)


def check_fits(initial: CheckpointReader, describe: dict, data_path: str) -> None:
    """This run's model (built on its corpus) must be the checkpoint's, token for token."""
    saved = dict(initial.manifest["describe"])
    keys = [k for k in mismatches(saved, describe) if k not in TRAINING_CHOICES]
    if not keys:
        return
    vocabulary = [k for k in keys if k in VOCABULARY_KEYS]
    if vocabulary:
        ours = ", ".join(short_value(k, describe.get(k)) for k in vocabulary)
        theirs = ", ".join(short_value(k, saved.get(k)) for k in vocabulary)
        raise UserError(f"corpus {data_path} ({ours}) was not tokenized like the model of "
                        f"train.init_from {initial.path} ({theirs}): prepare it with the "
                        f"model's tokenizer{_tokenizer_hint(initial)}")
    ours = ", ".join(short_value(k, describe.get(k)) for k in keys)
    theirs = ", ".join(short_value(k, saved.get(k)) for k in keys)
    raise UserError(f"train.init_from {initial.path} holds a model with {theirs}; this run "
                    f"builds {ours}")


def _tokenizer_hint(initial: CheckpointReader) -> str:
    """Where the model's tokenizer file is, for a run directory ``hpcps import`` wrote."""
    if "imported" not in initial.manifest:
        return ""
    run_dir = os.path.dirname(os.path.dirname(initial.path))
    path = os.path.join(run_dir, "tokenizer.json")
    return f" (hpcps prepare ... --tokenizer-file {path})" if os.path.exists(path) else ""


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
