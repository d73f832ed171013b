"""What every inference command does first: open a checkpoint of the right workload,
rebuild its model, load and check the parameters, recover the tokenizers, and turn
the user's text into ids (or say exactly why not).

Each workload has its own command; a checkpoint of another workload is refused with
the command that does use it, so a user who guessed wrong learns where to go.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Optional, Sequence, TextIO

import numpy as np

from hpcps.checkpoint import open_checkpoint
from hpcps.data.corpus import Corpus
from hpcps.data.seqcorpus import SequenceCorpus, checkpoint_tokenizer_text
from hpcps.data.tokenizer import Tokenizer
from hpcps.errors import UserError

# the commands that use a checkpoint of each workload (named in wrong-workload errors)
COMMANDS = {
    "gpt": "hpcps sample / hpcps eval",
    "bert": "hpcps fill-mask / hpcps eval",
    "seq2seq": "hpcps translate / hpcps eval",
    "rnn": "hpcps classify / hpcps eval",
    "skipgram": "hpcps embed / hpcps eval",
}
KIND_NAMES = {"gpt": "GPT", "bert": "BERT (masked LM)", "seq2seq": "seq2seq (translator)",
              "rnn": "classifier (rnn)", "skipgram": "skip-gram"}
PARALLEL_KEY = "parallel"      # tokenizer.json of a seq2seq run: {"parallel": {"src", "tgt"}}


def checkpoint_workload(ck) -> str:
    return ck.manifest.get("describe", {}).get("workload") or ck.config.workload


def wrong_workload(ck, purpose: str, wanted: Sequence[str]) -> UserError:
    """The one-line error for a checkpoint of a workload ``purpose`` cannot use."""
    workload = checkpoint_workload(ck)
    names = " or ".join(KIND_NAMES.get(w, w) for w in wanted)
    hint = f" (use {COMMANDS[workload]})" if workload in COMMANDS else ""
    return UserError(f"{purpose} needs a {names} checkpoint; {ck.path} holds workload "
                     f"'{workload}'{hint}")


def as_checkpoint(source):
    """A checkpoint reader from a path (a checkpoint or run directory) or an open reader,
    so a command that already opened (and verified) it does not do so twice."""
    return source if hasattr(source, "manifest") else open_checkpoint(source)


def open_for(source, wanted: Sequence[str], purpose: str):
    """(checkpoint reader, its manifest description) of a checkpoint of one of ``wanted``;
    ``source`` is a path or an open reader."""
    ck = as_checkpoint(source)
    if checkpoint_workload(ck) not in wanted:
        raise wrong_workload(ck, purpose, wanted)
    return ck, dict(ck.manifest.get("describe", {}))


def described(ck, describe: dict, key: str):
    """A value the checkpoint's description must hold (older checkpoints may lack it)."""
    if key not in describe:
        raise UserError(f"checkpoint {ck.path} does not record {key} (manifest describe.{key}); "
                        f"it was written by an older hpcps: retrain or resume it to rewrite it")
    return describe[key]


def check_layout(ck, layout, what: str = "model") -> None:
    """The rebuilt layout must name and size every tensor as the checkpoint recorded it."""
    if layout.total != ck.n_params:
        raise UserError(f"checkpoint {ck.path} holds {ck.n_params} parameters but its config "
                        f"builds a {what} with {layout.total}")
    saved = ck.manifest.get("layout")
    if saved is not None and saved != layout.describe():
        raise UserError(f"checkpoint {ck.path}: the saved parameter layout differs from the "
                        f"one this version of hpcps builds from its config")


def load_params(ck, model):
    """The checkpoint's flat fp32 parameters on the model's backend, after the checks."""
    check_layout(ck, model.layout, type(model).__name__)
    params = np.ascontiguousarray(ck.params(), dtype=np.float32)
    if not np.isfinite(params).all():
        raise UserError(f"checkpoint {ck.path} holds non-finite parameters (NaN or inf)")
    return model.backend.asarray(params)


# -- tokenizers -----------------------------------------------------------------------------
def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_json().encode()).hexdigest()


def saved_tokenizers(ck, fields: Sequence[str], describe: dict) -> dict:
    """field -> Tokenizer ("text", or "src" and "tgt") as the run's corpus defined them.

    Read from the checkpoint's tokenizer file; a checkpoint written before sequence
    corpora stored theirs falls back to the run's corpus (``data.path``) when it is
    still there and its tokenizers hash to what the checkpoint recorded.
    """

    text = ck.tokenizer_json()
    if text is not None:
        return _parse_tokenizers(text, fields, f"checkpoint {ck.path}")
    path = ck.config.data.path
    if not path or not os.path.exists(path):
        raise UserError(f"checkpoint {ck.path} holds no tokenizer and its corpus "
                        f"{path or '(none)'} is not here to supply one")
    found = _parse_tokenizers(checkpoint_tokenizer_text(path), fields, f"corpus {path}")
    for field, tokenizer in found.items():
        key = "tokenizer_sha256" if field == "text" else f"tokenizer_{field}_sha256"
        if tokenizer_sha256(tokenizer) != describe.get(key):
            raise UserError(f"checkpoint {ck.path} holds no tokenizer and its corpus {path} "
                            f"no longer matches it (tokenizer sha256 differs)")
    return found


def _parse_tokenizers(text: str, fields: Sequence[str], where: str) -> dict:
    """A stored tokenizer definition: one tokenizer ("text"), or a parallel corpus's two."""
    try:
        spec = json.loads(text)
    except ValueError:
        raise UserError(f"{where}: its tokenizer definition is not valid JSON") from None
    if isinstance(spec, dict) and isinstance(spec.get(PARALLEL_KEY), dict):
        found = {f: Tokenizer.from_json(json.dumps(v)) for f, v in spec[PARALLEL_KEY].items()}
    else:
        found = {"text": Tokenizer.from_json(text)}
    missing = [f for f in fields if f not in found]
    if missing:
        raise UserError(f"{where} has tokenizers for {', '.join(found)}, not for "
                        f"{', '.join(missing)}")
    return {f: found[f] for f in fields}


def open_lm_corpus(data_path: str, what: str):
    """A language-model corpus for evaluating a ``what`` checkpoint; a sequence corpus
    (parallel, classification) is named as such instead of failing on its attributes."""
    try:
        with SequenceCorpus.open(data_path) as seq:
            kind = seq.kind
    except UserError:
        return Corpus.open(data_path)      # not a sequence corpus: an LM corpus, or its error
    raise UserError(f"corpus {data_path} is a '{kind}' corpus; a {what} checkpoint is evaluated "
                    f"on a language-model corpus (prepared from text files)")


def check_corpus_tokenizer(tokenizer, expected_sha: str, data_path: str, ck_path: str,
                           side: str = "") -> None:
    """A corpus must be tokenized exactly as the checkpoint's training corpus was."""
    sha = tokenizer_sha256(tokenizer)
    if expected_sha and sha != expected_sha:
        which = f"{side} side of " if side else ""
        raise UserError(f"the {which}corpus {data_path} was tokenized differently from "
                        f"checkpoint {ck_path} ({tokenizer.kind} vocab {tokenizer.vocab_size}, "
                        f"tokenizer sha256 {sha[:12]} != {expected_sha[:12]}): prepare it with "
                        f"the checkpoint's tokenizer")


def encode_text(tokenizer, text: str, where: str) -> np.ndarray:
    """int64 ids of ``text``; an empty text or characters the tokenizer lacks are errors
    that name the input line and the characters."""
    if not text.strip():
        raise UserError(f"{where} is empty: give some text to work on")
    ids = encode_piece(tokenizer, text, where)
    if len(ids) == 0:
        raise UserError(f"{where} encodes to no tokens")
    return ids


def encode_piece(tokenizer, text: str, where: str) -> np.ndarray:
    """int64 ids of a piece of an input (any piece, whitespace too)."""
    try:
        return np.asarray(tokenizer.encode(text), dtype=np.int64)
    except UserError as err:
        raise UserError(f"{where} cannot be encoded by the checkpoint's {tokenizer.kind} "
                        f"tokenizer: {err}") from None


# -- input lines ----------------------------------------------------------------------------
def input_lines(texts: Sequence[str], input_path: Optional[str],
                stdin: Optional[TextIO] = None) -> list[tuple[str, str]]:
    """(where, text) per input: the TEXT arguments, else the lines of --input FILE, else
    of standard input ('-' reads it too). ``where`` names the input in errors."""
    if texts and input_path:
        raise UserError("give TEXT arguments or --input FILE, not both")
    if texts:
        return [(f"TEXT argument {i}", t) for i, t in enumerate(texts, start=1)]
    if input_path and input_path != "-":
        try:
            with open(input_path, encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except OSError as err:
            raise UserError(f"--input {input_path}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"--input {input_path} is not UTF-8 text (byte {err.start})") \
                from None
        name = input_path
    else:
        lines = (stdin if stdin is not None else sys.stdin).read().split("\n")
        name = "standard input"
    if lines and lines[-1] == "":
        lines.pop()                                   # the final newline ends the last line
    if not lines:
        raise UserError(f"{name} holds no lines to work on")
    return [(f"{name} line {i}", line.rstrip("\r")) for i, line in enumerate(lines, start=1)]
