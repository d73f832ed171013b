"""Small synthetic corpora, written in the sequence-corpus format that ``hpcps prepare``
writes, for the tests of one workload and its runs through the parameter server.

- ``write_mapping_corpus``: a parallel corpus (a toy translation, seq2seq);
- ``make_classification_corpus``: a 4-class corpus (the RNN classifier).
"""

from __future__ import annotations

import numpy as np

LETTERS = "abcdefghij"
HANZI = "".join(sorted("一二三四五六七八九十"))   # char vocabularies are sorted


def mapping_pairs(n: int, seed: int, lengths: tuple = (3, 8)) -> list[tuple[str, str]]:
    """A toy 'translation': each letter becomes a character, in reverse order; sources of
    lengths[0] to lengths[1] - 1 letters."""
    r = np.random.default_rng(seed)
    table = dict(zip(LETTERS, HANZI))
    out = []
    for _ in range(n):
        src = "".join(r.choice(list(LETTERS), int(r.integers(*lengths))))
        out.append((src, "".join(table[ch] for ch in reversed(src))))
    return out


def write_mapping_corpus(path, n_train: int = 2000, n_val: int = 64, seed: int = 0,
                         lengths: tuple = (3, 8)):
    """A real parallel corpus file (the format `hpcps prepare --parallel` writes)."""
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import CharTokenizer
    toks = {"src": CharTokenizer(LETTERS), "tgt": CharTokenizer(HANZI)}
    splits = {}
    for name, pairs in (("train", mapping_pairs(n_train, seed, lengths)),
                        ("val", mapping_pairs(n_val, seed + 1, lengths))):
        texts = {"src": [p[0] for p in pairs], "tgt": [p[1] for p in pairs]}
        splits[name] = SplitItems(tokens={f: [toks[f].encode(t) for t in texts[f]] for f in texts},
                                  texts=texts)
    write_sequence_corpus(str(path), "parallel", splits, toks, {"src_lang": "en",
                                                                 "tgt_lang": "zh_CN"})
    return path


def make_classification_corpus(path, n_train=1200, n_val=300, seed=0, lengths=(4, 25)):
    """Four synthetic 'languages': strings from four different bigram chains over 12
    letters, so only the order of characters (not single letters alone) tells them apart;
    strings of lengths[0] to lengths[1] - 1 letters."""
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import ByteTokenizer
    rng = np.random.default_rng(seed)
    letters = "abcdefghijkl"
    chains = [rng.dirichlet(np.full(12, 0.15), size=12) for _ in range(4)]

    def sample(n):
        texts, labels = [], []
        for _ in range(n):
            label = int(rng.integers(4))
            state, out = int(rng.integers(12)), []
            for _ in range(int(rng.integers(*lengths))):
                state = int(rng.choice(12, p=chains[label][state]))
                out.append(letters[state])
            texts.append("".join(out))
            labels.append(label)
        return texts, np.array(labels, np.int32)
    tok = ByteTokenizer()
    splits = {}
    for name, n in (("train", n_train), ("val", n_val)):
        texts, labels = sample(n)
        splits[name] = SplitItems(tokens={"text": [tok.encode(t) for t in texts]},
                                  texts={"text": texts}, labels=labels)
    write_sequence_corpus(str(path), "classification", splits, {"text": tok},
                          {"label_names": '["w", "x", "y", "z"]'})
    return path
