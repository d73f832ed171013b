"""Pretrained GPT-2 directories for the tests of ``hpcps import`` and ``train.init_from``,
made here from nothing downloaded:

- ``hpcps_gpt2_dir``: a GPT trained briefly by hpcps on a byte-level BPE ``tokenizer.json``
  (trained by the ``tokenizers`` library), exported with ``hpcps export --format hf-gpt2``,
  the ``tokenizer.json`` beside it: a Hugging Face directory that needs no PyTorch;
- ``transformers_gpt2_dir``: a ``GPT2LMHeadModel`` trained briefly with PyTorch and saved by
  ``save_pretrained`` (safetensors), for the parity checks with ``transformers``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from mpi_util import QUIET_THREADS, run_command

# two texts: the pretraining one, and a new one to fine-tune on, which the pretraining saw
# a little of (as a published model has seen some text like the one it is tuned on)
FINETUNE_TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little "
                 "money in my purse, I thought I would sail about a little. ") * 80
PRETRAIN_TEXT = ("It was the best of times, it was the worst of times; it was the age of wisdom, "
                 "it was the age of foolishness. ") * 80 + FINETUNE_TEXT[:1500]
EOT = "<|endoftext|>"
SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "model.bias=true"]


def write_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json trained on both texts, with EOT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([PRETRAIN_TEXT, FINETUNE_TEXT], trainer=trainer)
    tok.save(str(path))
    return path


def prepare_text(text: str, tokenizer_file: Path, out: Path) -> Path:
    from hpcps.data.prepare import prepare
    src = out.with_suffix(".txt")
    src.write_text(text, encoding="utf-8")
    prepare([str(src)], str(out), tokenizer_file=str(tokenizer_file), quiet=True)
    return out


def hpcps(*args, timeout: float = 120):
    """``python -m hpcps ARGS`` in a subprocess with one BLAS thread; fails on a timeout."""
    import os
    return run_command([sys.executable, "-m", "hpcps", *map(str, args)], timeout,
                       env=dict(os.environ, **QUIET_THREADS))


def hpcps_gpt2_dir(root: Path, extra: tuple = ()) -> Path:
    """A Hugging Face GPT-2 directory of a GPT that hpcps trained for 60 steps."""
    tokenizer = write_tokenizer(root / "bpe_tokenizer.json")
    corpus = prepare_text(PRETRAIN_TEXT, tokenizer, root / "pretrain.h5")
    run = root / "pretrain_run"
    proc = hpcps("train", f"data.path={corpus}", f"out_dir={run}", *SHAPE, *extra,
                 "train.batch_size=8", "train.max_steps=60", "train.lr=3e-3",
                 "train.warmup_steps=5", "train.eval_every=0", "train.eval_steps=1",
                 "train.log_every=100", "train.peak_flops=1e12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "gpt2"
    proc = hpcps("export", run, "--format", "hf-gpt2", "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(tokenizer, out / "tokenizer.json")
    return out


def transformers_gpt2_dir(root: Path, *, tie: bool = True, shard: bool = False,
                          vocab_merges: bool = False) -> Path:
    """A ``GPT2LMHeadModel`` trained 40 steps by PyTorch, saved with safetensors (sharded
    when ``shard``) and its tokenizer (as vocab.json + merges.txt when ``vocab_merges``)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer_file = write_tokenizer(root / "bpe_tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_file))
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2,
                        n_head=2, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    ids = torch.tensor(tok.encode(PRETRAIN_TEXT).ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        x = torch.stack([ids[s:s + 32] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = root / "gpt2"
    model.save_pretrained(str(out), safe_serialization=True,
                          **({"max_shard_size": "40KB"} if shard else {}))
    if vocab_merges:
        tok.model.save(str(out))                       # vocab.json + merges.txt
        (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOT}))
    else:
        shutil.copy(tokenizer_file, out / "tokenizer.json")
    return out


def state_dict(directory: Path) -> dict:
    """Every tensor of a directory's safetensors files (read by the reference library)."""
    from safetensors.numpy import load_file
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
