"""A trained translator (workload ``seq2seq``): load it, translate text with beam search,
and score it on a parallel corpus split.

The model is rebuilt from the checkpoint's description and its tokenizers (one per
side, or one shared) from the checkpoint itself, so translating needs no corpus.
Evaluation uses the metrics of training: teacher-forced loss, corpus BLEU with the
``zh`` tokenizer (each Chinese character a token, the rest as mteval-13a), chrF as
sacrebleu computes it, and both for the untranslated source as the copy baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hpcps.backend import CPU
from hpcps.data.seqcorpus import SequenceCorpus
from hpcps.errors import UserError
from hpcps.inference.checkpoint import (
    check_corpus_tokenizer,
    described,
    encode_text,
    load_params,
    open_for,
    saved_tokenizers,
)
from hpcps.metrics.chrf import chrf_stats, f_score
from hpcps.metrics.text import bleu
from hpcps.model.seq2seq import Seq2Seq
from hpcps.workloads.seq2seq import SideVocab, pad_batch

DECODE_CHUNK = 32           # sources decoded together (sorted by length, so they pad little)
BLEU_TOKENIZE = "zh"        # what val_bleu uses: the copy baseline of docs/workloads.md


@dataclass
class Translator:
    checkpoint: object      # hpcps.checkpoint.CheckpointReader
    model: object           # hpcps.model.seq2seq.Seq2Seq
    params: object
    src: object             # hpcps.workloads.seq2seq.SideVocab
    tgt: object
    alpha: float            # the run's length penalty (seq2seq.length_penalty)
    beam: int               # the run's evaluation beam (seq2seq.beam)

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def encode(self, text: str, where: str) -> np.ndarray:
        return encode_text(self.src.tokenizer, text, where)

    def translate(self, sources: list, beam: int, n_best: int = 1,
                  max_len: Optional[int] = None, alpha: Optional[float] = None,
                  on_progress: Optional[Callable[[int], None]] = None) -> list:
        """Per source (a token id array): its ``n_best`` translations as (text, score,
        log-prob), best first. Sources are decoded in chunks of similar length; a
        source's result does not depend on its chunk."""
        check_search(beam, n_best, max_len)
        alpha = self.alpha if alpha is None else alpha
        backend = self.model.backend
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list = [None] * len(sources)
        for a in range(0, len(order), DECODE_CHUNK):
            chunk = [sources[i] for i in order[a:a + DECODE_CHUNK]]
            src, src_len, _, _ = pad_batch(chunk, [[]] * len(chunk), self.src, self.tgt,
                                           self.model.max_src_len, self.model.max_tgt_len)
            found = self.model.beam_search_nbest(
                self.params, backend.asarray(src), backend.asarray(src_len), self.tgt.bos,
                self.tgt.eos, beam=beam, alpha=alpha, max_len=max_len,
                banned=(self.tgt.pad, self.tgt.bos))
            for i, hyps in zip(order[a:a + DECODE_CHUNK], found):
                out[i] = [(self.tgt.decode(h.tokens), float(h.score), float(h.log_prob))
                          for h in hyps[:n_best]]
            if on_progress is not None:
                on_progress(len(chunk))
        return out


def check_search(beam: int, n_best: int, max_len: Optional[int]) -> None:
    if beam < 1:
        raise UserError(f"--beam must be at least 1 (1 is greedy decoding), got {beam}")
    if not 1 <= n_best <= beam:
        raise UserError(f"--n-best must be between 1 and --beam ({beam}), got {n_best}")
    if max_len is not None and max_len < 1:
        raise UserError(f"--max-len must be at least 1, got {max_len}")


def load_translator(path: str, backend=None, purpose: str = "hpcps translate") -> Translator:
    """Open a seq2seq checkpoint (or a run directory's newest) and rebuild its model."""
    ck, describe = open_for(path, ("seq2seq",), purpose)
    toks = saved_tokenizers(ck, ("src", "tgt"), describe)
    src, tgt = SideVocab(toks["src"]), SideVocab(toks["tgt"])
    for side, vocab in (("src", src), ("tgt", tgt)):
        if vocab.size != int(described(ck, describe, f"{side}_vocab")):
            raise UserError(f"checkpoint {ck.path}: its {side} tokenizer gives {vocab.size} ids "
                            f"but the model was built for {describe[f'{side}_vocab']}")
    keys = ("n_layer", "n_dec_layer", "n_head", "n_embd", "max_src_len", "max_tgt_len", "bias",
            "tie_embeddings")
    shape = {k: described(ck, describe, k) for k in keys}
    model = Seq2Seq(src_vocab=src.size, tgt_vocab=tgt.size, dropout=0.0,
                    share_embeddings=bool(describe.get("share_embeddings", False)),
                    backend=backend or CPU, **shape)
    params = load_params(ck, model)
    sc = ck.config.seq2seq
    return Translator(ck, model, params, src, tgt, sc.length_penalty, sc.beam)


# -- evaluation ---------------------------------------------------------------------------
def open_parallel(translator: Translator, data_path: str):
    corpus = SequenceCorpus.open(data_path)
    if corpus.kind != "parallel":
        corpus.close()
        raise UserError(f"corpus {data_path} is a '{corpus.kind}' corpus; a seq2seq checkpoint "
                        f"is evaluated on a parallel corpus (`hpcps prepare --parallel`)")
    describe = translator.checkpoint.manifest.get("describe", {})
    for side in ("src", "tgt"):
        check_corpus_tokenizer(corpus.tokenizers[side],
                               describe.get(f"tokenizer_{side}_sha256", ""), data_path,
                               translator.checkpoint.path, side)
    return corpus


def evaluate(translator: Translator, corpus, split: str, max_items: Optional[int],
             beam: int, batch_size: int = 32,
             on_progress: Optional[Callable[[int], None]] = None) -> dict:
    """Teacher-forced loss, BLEU and chrF of the beam translations, and the copy baseline,
    over the first ``max_items`` pairs of ``split`` (all when None)."""
    part = corpus.split(split)
    n = part.n if max_items is None else min(part.n, max_items)
    idx = np.arange(n)
    src_lists, tgt_lists = part.get("src", idx), part.get("tgt", idx)
    refs, sources = part.texts("tgt", idx), part.texts("src", idx)
    model, backend = translator.model, translator.model.backend
    nll, count = 0.0, 0
    for a in range(0, n, batch_size):
        batch = pad_batch(src_lists[a:a + batch_size], tgt_lists[a:a + batch_size],
                          translator.src, translator.tgt, model.max_src_len, model.max_tgt_len)
        part_nll, part_count = model.loss_sum(translator.params,
                                              *(backend.asarray(x) for x in batch))
        nll += part_nll
        count += part_count
    hyps = [found[0][0] for found in translator.translate(src_lists, beam,
                                                          on_progress=on_progress)]
    loss = nll / max(count, 1)
    result = {"pairs": n, "split": split, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "target_tokens": count, "beam": beam}
    result.update(text_scores(hyps, refs, ""))
    result.update(text_scores(list(sources), refs, "copy_"))
    result["examples"] = [{"source": s, "reference": r, "translation": h}
                          for s, r, h in zip(sources[:10], refs[:10], hyps[:10])]
    return result


def text_scores(hyps: list, refs: list, prefix: str) -> dict:
    """BLEU (zh tokenizer) with its parts, and chrF, of hypotheses against references."""
    stats = bleu(hyps, refs, tokenize=BLEU_TOKENIZE)
    return {f"{prefix}bleu": stats["score"],
            f"{prefix}bleu_precisions": stats["precisions"], f"{prefix}bleu_bp": stats["bp"],
            f"{prefix}chrf": f_score(chrf_stats(hyps, refs))}
