"""The files of a Hugging Face model directory: ``config.json``, the weights and the tokenizer.

Weights are read from safetensors only: ``model.safetensors``, or the shards that
``model.safetensors.index.json`` lists. A directory with only pickle weights
(``pytorch_model.bin``) is refused, since loading a pickle can run any code; the
error says how to convert it. The tokenizer is ``tokenizer.json`` as shipped, or
one built from the older ``vocab.json`` + ``merges.txt`` pair (byte-level BPE, as
GPT-2 defines it), so ``hpcps prepare --tokenizer-file`` can read it.
"""

from __future__ import annotations

import glob
import json
import os

from hpcps.data.safetensors import read_safetensors
from hpcps.data.tokenizer import require_tokenizers
from hpcps.errors import UserError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt")
TOKENIZER_JSON = "tokenizer.json"
VOCAB, MERGES = "vocab.json", "merges.txt"
# where older directories name their special tokens (bos, eos, unk, pad)
SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; every problem is one line naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def check_model_dir(directory: str) -> None:
    if not os.path.exists(directory):
        raise UserError(f"model directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise UserError(f"{directory} is not a directory (give the folder with config.json "
                        f"and model.safetensors)")


# -- weights ------------------------------------------------------------------------------
def read_weights(directory: str) -> tuple[dict, str]:
    """(name -> tensor, a description of the files read) from the safetensors weights."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    single = os.path.join(directory, SAFETENSORS)
    if os.path.exists(index):
        return _read_sharded(directory, index)
    if os.path.exists(single):
        return read_safetensors(single)[0], SAFETENSORS
    shards = sorted(glob.glob(os.path.join(directory, "model-*-of-*.safetensors")))
    if shards:
        raise UserError(f"{directory} has sharded weights ({os.path.basename(shards[0])}, ...) "
                        f"but no {SAFETENSORS_INDEX} to say which tensor is where")
    pickles = sorted({os.path.basename(p) for pattern in PICKLE_PATTERNS
                      for p in glob.glob(os.path.join(directory, pattern))})
    if pickles:
        raise UserError(
            f"{directory} holds its weights only as pickle ({', '.join(pickles)}), which can run "
            f"code when loaded: hpcps reads safetensors only. Convert it where you trust the "
            f"file, e.g. python -c \"import transformers as t; t.AutoModelForCausalLM."
            f"from_pretrained('{directory}').save_pretrained('{directory.rstrip(os.sep)}"
            f"-safetensors', safe_serialization=True)\", then import that directory")
    raise UserError(f"{directory} has no weights: expected {SAFETENSORS} (or "
                    f"{SAFETENSORS_INDEX} with its shards)")


def _read_sharded(directory: str, index_path: str) -> tuple[dict, str]:
    index = read_json(index_path, "the index of the sharded weights")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path} has no weight_map (tensor name -> shard file)")
    tensors: dict = {}
    files = sorted(set(weight_map.values()))
    for name in files:
        path = os.path.join(directory, str(name))
        if os.path.basename(str(name)) != name or not os.path.isfile(path):
            raise UserError(f"{index_path} lists shard {name!r}, which is not a file in "
                            f"{directory}")
        tensors.update(read_safetensors(path)[0])
    for name, file in weight_map.items():
        if name not in tensors:
            raise UserError(f"{index_path} puts tensor {name} in {file}, which lacks it")
    return tensors, f"{len(files)} safetensors shards"


# -- tokenizer ----------------------------------------------------------------------------
def tokenizer_definition(directory: str) -> tuple[str, str]:
    """(the text of a tokenizer.json, the files it came from)."""
    path = os.path.join(directory, TOKENIZER_JSON)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read(), TOKENIZER_JSON
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
    have = [f for f in (VOCAB, MERGES) if os.path.exists(os.path.join(directory, f))]
    if len(have) == 2:
        return _byte_level_bpe(directory), f"{VOCAB} + {MERGES}"
    if have:
        missing = MERGES if have == [VOCAB] else VOCAB
        raise UserError(f"{directory} has {have[0]} but no {missing}: the tokenizer needs both "
                        f"(or a {TOKENIZER_JSON})")
    raise UserError(f"{directory} has no tokenizer ({TOKENIZER_JSON}, or {VOCAB} + {MERGES}): "
                    f"copy the model's tokenizer files into it")


def _byte_level_bpe(directory: str) -> str:
    """GPT-2's tokenizer from its vocabulary and merge list: byte-level pre-tokenizer and
    decoder, no prefix space unless the directory's tokenizer_config.json asks for one,
    the special tokens it names kept whole."""
    vocab = read_json(os.path.join(directory, VOCAB), "the tokenizer vocabulary")
    merges_path = os.path.join(directory, MERGES)
    try:
        with open(merges_path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {merges_path}: {err}") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{merges_path} line {number}: expected two tokens separated by "
                            f"one space, got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    lib = require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors  # optional package
    prefix_space = bool(_tokenizer_config(directory).get("add_prefix_space", False))
    try:
        backend = lib.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as err:  # the library raises its own exception types
        raise UserError(f"{directory}: {VOCAB} and {MERGES} do not form a BPE tokenizer: "
                        f"{str(err).splitlines()[0]}") from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([t for t in special_tokens(directory) if t in vocab])
    return backend.to_str()


def _tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    return read_json(path, "") if os.path.exists(path) else {}


def special_tokens(directory: str) -> list[str]:
    """The special tokens the directory names; GPT-2's end-of-text when it names none."""
    found: list = []
    for name in SPECIAL_TOKEN_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        spec = read_json(path, "")
        for key in SPECIAL_TOKEN_KEYS:
            value = spec.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str) and text not in found:
                found.append(text)
    return found or ["<|endoftext|>"]
