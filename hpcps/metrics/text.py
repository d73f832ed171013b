"""Text-generation metrics: corpus BLEU, ROUGE-N / ROUGE-L and perplexity.

BLEU reproduces sacrebleu's default ``corpus_bleu`` (BLEU-4, 'exp' smoothing of
zero n-gram counts, closest reference length, 13a tokenizer) so scores can be
compared with published numbers. ROUGE reproduces ``rouge_score.RougeScorer``
without stemming. Both are pure Python: no extra dependency at run time.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from typing import Iterable, Sequence, Union

from hpcps.errors import UserError

MAX_ORDER = 4
BLEU_TOKENIZERS = ("13a", "zh", "char", "none")
ROUGE_TOKENIZERS = ("default", "char")

# -- tokenizers ------------------------------------------------------------------------

# The rules of mteval-v13a.pl (the WMT reference scorer), applied in this order.
# ASCII punctuation except apostrophe, hyphen, period and comma is always split off.
_SPLIT_PUNCT = re.compile(r"([{|}~\[\\\]^_` !\"#$%&()*+:;<=>?@/])")
_PERIOD_COMMA_AFTER_NONDIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE_NONDIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def _mteval_split(text: str) -> str:
    text = _SPLIT_PUNCT.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NONDIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NONDIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return " ".join(text.split())


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenization: the default of sacrebleu and WMT."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (line.replace("&quot;", '"').replace("&amp;", "&")
                .replace("&lt;", "<").replace("&gt;", ">"))
    return _mteval_split(f" {line} ")


# Code points sacrebleu's zh tokenizer treats as Chinese. sacrebleu spells its two
# supplementary-plane ranges with 4-digit escapes, so in practice they cover
# U+2001-U+2A6D and U+2F81-U+2FA1 (general punctuation, arrows, symbols) instead of
# CJK Extension B; we reproduce what it does, not what it meant, to match its scores.
_ZH_RANGES = (
    (0x2001, 0x2A6D), (0x2E80, 0x2FDF), (0x2FF0, 0x303F), (0x3100, 0x312F),
    (0x31A0, 0x31EF), (0x3200, 0x4DB5), (0x4E00, 0x9FBB), (0xF900, 0xFA2D),
    (0xFA30, 0xFA6A), (0xFA70, 0xFAD9), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F),
    (0xFF00, 0xFFEF),
)
_ZH_STARTS = [start for start, _ in _ZH_RANGES]


def is_chinese_char(char: str) -> bool:
    cp = ord(char)
    i = bisect.bisect_right(_ZH_STARTS, cp) - 1
    return i >= 0 and cp <= _ZH_RANGES[i][1]


def tokenize_zh(line: str) -> str:
    """Each Chinese character becomes its own token; the rest follows the 13a rules."""
    spaced = "".join(f" {c} " if is_chinese_char(c) else c for c in line.strip())
    return _mteval_split(spaced)


def tokenize_char(line: str) -> str:
    return " ".join(line)


_BLEU_TOKENIZE = {"13a": tokenize_13a, "zh": tokenize_zh, "char": tokenize_char,
                  "none": lambda line: line}


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")


# -- BLEU ------------------------------------------------------------------------------

RefsArg = Union[Sequence[str], Sequence[Sequence[str]]]


def _refs_per_item(hyps: Sequence[str], refs: RefsArg) -> list[list[str]]:
    """Normalise ``refs`` to one list of references per hypothesis."""
    if isinstance(refs, str) or isinstance(hyps, str):
        raise UserError("hyps and refs must be lists of strings, not a single string")
    if len(hyps) == 0:
        raise UserError("no hypotheses to score")
    if len(refs) != len(hyps):
        raise UserError(f"hyp has {len(hyps)} lines, ref has {len(refs)}")
    per_item = []
    for i, item in enumerate(refs):
        group = [item] if isinstance(item, str) else list(item)
        if not group or not all(isinstance(r, str) for r in group):
            raise UserError(f"item {i}: references must be a non-empty list of strings")
        per_item.append(group)
    return per_item


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


def _closest_ref_len(hyp_len: int, ref_lens: Iterable[int]) -> int:
    # Closest length wins; on a tie the shorter reference (as mteval and sacrebleu).
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def bleu(hyps: Sequence[str], refs: RefsArg, tokenize: str = "13a",
         lowercase: bool = False) -> dict:
    """Corpus BLEU-4 on a 0-100 scale, equal to sacrebleu's default ``corpus_bleu``.

    ``refs[i]`` is the reference of ``hyps[i]``, or a list of references for it
    (any number per item; note sacrebleu's own argument is the transpose: one list
    per reference stream). Returns ``score``, ``precisions`` (percent, n=1..4),
    ``bp``, ``sys_len``, ``ref_len``, ``counts`` and ``totals``.
    """
    _check_choice("BLEU tokenizer", tokenize, BLEU_TOKENIZERS)
    per_item = _refs_per_item(hyps, refs)
    tok = _BLEU_TOKENIZE[tokenize]

    def prep(text: str) -> list[str]:
        if lowercase:
            text = text.lower()
        return tok(text.rstrip()).split()

    correct = [0] * MAX_ORDER
    total = [0] * MAX_ORDER
    sys_len = ref_len = 0
    for hyp, group in zip(hyps, per_item):
        hyp_tokens = prep(hyp)
        ref_max: Counter = Counter()
        ref_lens = []
        for ref in group:
            ref_tokens = prep(ref)
            ref_lens.append(len(ref_tokens))
            ref_max |= _ngrams(ref_tokens, MAX_ORDER)  # element-wise max over references
        sys_len += len(hyp_tokens)
        ref_len += _closest_ref_len(len(hyp_tokens), ref_lens)
        for gram, count in _ngrams(hyp_tokens, MAX_ORDER).items():
            n = len(gram) - 1
            total[n] += count
            correct[n] += min(count, ref_max.get(gram, 0))
    return _bleu_from_stats(correct, total, sys_len, ref_len)


def _bleu_from_stats(correct: list[int], total: list[int], sys_len: int, ref_len: int) -> dict:
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * MAX_ORDER
    score = 0.0
    if any(correct):
        # 'exp' smoothing (mteval): the k-th order with zero matches gets 1 / (2^k * total).
        halvings = 1.0
        complete = True
        for n in range(MAX_ORDER):
            if total[n] == 0:  # hypotheses too short for this order: BLEU-4 is 0
                complete = False
                break
            if correct[n] == 0:
                halvings *= 2
                precisions[n] = 100.0 / (halvings * total[n])
            else:
                precisions[n] = 100.0 * correct[n] / total[n]
        if complete:
            score = bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return {"score": score, "precisions": precisions, "bp": bp, "sys_len": sys_len,
            "ref_len": ref_len, "counts": list(correct), "totals": list(total)}


# -- ROUGE -----------------------------------------------------------------------------

_ROUGE_TYPE = re.compile(r"rouge([1-9]|L)$")
_ALNUM_RUN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str, tokenize: str = "default") -> list[str]:
    """rouge-score's tokens (lowercase ASCII letter/digit runs), or one per character.

    The default drops everything outside [a-z0-9], so Chinese text has no tokens at
    all; ``char`` keeps every letter or digit of any script as its own token.
    """
    text = text.lower()
    if tokenize == "char":
        return [c for c in text if c.isalnum()]
    return _ALNUM_RUN.findall(text)


def _prf(overlap: int, n_hyp: int, n_ref: int) -> tuple[float, float, float]:
    p = overlap / max(n_hyp, 1)
    r = overlap / max(n_ref, 1)
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def _lcs_len(a: list[str], b: list[str]) -> int:
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def _rouge_pair(rouge_type: str, hyp: list[str], ref: list[str]) -> tuple[float, float, float]:
    if rouge_type == "rougeL":
        if not hyp or not ref:
            return 0.0, 0.0, 0.0
        return _prf(_lcs_len(hyp, ref), len(hyp), len(ref))
    n = int(rouge_type[5:])
    hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((hyp_grams & ref_grams).values())
    return _prf(overlap, sum(hyp_grams.values()), sum(ref_grams.values()))


def check_rouge_types(types: Sequence[str]) -> None:
    for rouge_type in types:
        if not _ROUGE_TYPE.match(rouge_type):
            raise UserError(f"unknown ROUGE type '{rouge_type}' (use rouge1..rouge9 or rougeL)")


def rouge(hyps: Sequence[str], refs: RefsArg, types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
          tokenize: str = "default") -> dict[str, dict[str, float]]:
    """Mean ROUGE precision ``p``, recall ``r`` and F-measure ``f`` over items.

    Per item this equals ``rouge_score.rouge_scorer.RougeScorer(types,
    use_stemmer=False).score(ref, hyp)``; with several references per item the one
    with the best F-measure counts (as its ``score_multi``). Types: rouge1..rouge9,
    rougeL.
    """
    _check_choice("ROUGE tokenizer", tokenize, ROUGE_TOKENIZERS)
    if isinstance(types, str):
        types = (types,)
    check_rouge_types(types)
    per_item = _refs_per_item(hyps, refs)
    sums = {t: [0.0, 0.0, 0.0] for t in types}
    for hyp, group in zip(hyps, per_item):
        hyp_tokens = rouge_tokens(hyp, tokenize)
        ref_tokens = [rouge_tokens(r, tokenize) for r in group]
        for rouge_type in types:
            scores = [_rouge_pair(rouge_type, hyp_tokens, ref) for ref in ref_tokens]
            best = max(scores, key=lambda prf: prf[2])  # first of equal F-measures
            for k in range(3):
                sums[rouge_type][k] += best[k]
    n = len(hyps)
    return {t: {"p": s[0] / n, "r": s[1] / n, "f": s[2] / n} for t, s in sums.items()}


# -- perplexity ------------------------------------------------------------------------

def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), natural log; inf on overflow."""
    if n_tokens <= 0:
        raise UserError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    if not math.isfinite(nll_sum):
        raise UserError(f"perplexity needs a finite nll_sum, got {nll_sum}")
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf


def nll_from_lines(lines: Iterable[str], source: str = "input") -> tuple[float, int]:
    """Sum the negative log-likelihoods in ``lines``: each line is either one token's
    NLL or ``"nll_sum n_tokens"``. Blank lines are skipped. Returns (nll_sum, n_tokens).
    """
    nll_sum, n_tokens = 0.0, 0
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source} line {number}"
        if len(fields) > 2:
            raise UserError(f"{where}: expected 'NLL' or 'NLL_SUM N_TOKENS', got {line.strip()!r}")
        try:
            value = float(fields[0])
            count = int(fields[1]) if len(fields) == 2 else 1
        except ValueError:
            raise UserError(f"{where}: expected 'NLL' or 'NLL_SUM N_TOKENS', "
                            f"got {line.strip()!r}") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: negative log-likelihood must be finite and >= 0, got {value}")
        if count <= 0:
            raise UserError(f"{where}: token count must be positive, got {count}")
        nll_sum += value
        n_tokens += count
    if n_tokens == 0:
        raise UserError(f"{source} has no negative log-likelihood values")
    return nll_sum, n_tokens
