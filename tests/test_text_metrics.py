"""BLEU, ROUGE and perplexity: hand-computed cases that always run, and agreement with
sacrebleu / rouge-score on real text when those libraries are installed."""

import math
import random
from pathlib import Path

import pytest

from hpcps.errors import UserError
from hpcps.metrics import bleu, nll_from_lines, perplexity, rouge
from hpcps.metrics.text import is_chinese_char, rouge_tokens, tokenize_13a, tokenize_zh

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"

# -- tokenizers ------------------------------------------------------------------------


def test_13a_tokenizer_splits_by_the_mteval_rules():
    assert tokenize_13a("Hello, world! It's 3.5-4 km.") == "Hello , world ! It's 3.5 - 4 km ."
    assert tokenize_13a("1,000.5 x.y a..b (ok)?") == "1,000.5 x . y a . . b ( ok ) ?"
    assert tokenize_13a("&quot;hi&quot; &amp; <skipped>bye") == '" hi " & bye'
    assert tokenize_13a("well-known e-mail") == "well-known e-mail"  # hyphens stay in words


def test_zh_tokenizer_splits_chinese_characters_only():
    assert tokenize_zh("我爱北京, ok 2.5-3!") == "我 爱 北 京 , ok 2.5 - 3 !"
    assert tokenize_zh("“你好”") == "“ 你 好 ”"  # U+201C/D count as Chinese, as in sacrebleu
    assert is_chinese_char("中") and is_chinese_char("，") and not is_chinese_char("a")
    assert not is_chinese_char("\U00020000")  # sacrebleu never splits Extension B


# -- BLEU by hand ----------------------------------------------------------------------


def test_bleu_identical_corpus_is_100():
    out = bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert out["score"] == pytest.approx(100.0)
    assert out["bp"] == 1.0 and out["sys_len"] == out["ref_len"] == 6


def test_bleu_hand_computed_with_brevity_penalty():
    # hyp "a b c d e" vs ref "a b c d f g": matches 4/5, 3/4, 2/3, 1/2; bp = exp(1 - 6/5)
    out = bleu(["a b c d e"], ["a b c d f g"])
    assert out["counts"] == [4, 3, 2, 1] and out["totals"] == [5, 4, 3, 2]
    assert out["bp"] == pytest.approx(math.exp(-0.2))
    expected = 100 * math.exp(-0.2) * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert out["score"] == pytest.approx(expected, abs=1e-9)


def test_bleu_exp_smoothing_of_a_zero_count():
    # no 4-gram matches: its precision becomes 100 / (2 * 1)
    out = bleu(["a b c x"], ["a b c y"])
    assert out["precisions"] == pytest.approx([75.0, 200 / 3, 50.0, 50.0])
    assert out["score"] == pytest.approx((75.0 * (200 / 3) * 50.0 * 50.0) ** 0.25)


def test_bleu_zero_cases():
    assert bleu(["a b c"], ["a b c"])["score"] == 0.0      # no 4-grams at all
    empty = bleu([""], ["a b c d"])
    assert empty["score"] == 0.0 and empty["bp"] == 0.0
    assert bleu(["w x y z"], ["a b c d"])["score"] == 0.0  # nothing matches


def test_bleu_multiple_references_clip_by_max_and_pick_closest_length():
    # "the" occurs twice in ref 2: both hyp "the"s count; closest length: tie 4 vs 6 -> 4
    out = bleu(["the the cat sat x"], [["a cat sat", "the the dog ran"]])
    assert out["counts"][0] == 4
    assert out["ref_len"] == 4
    assert bleu(["a b c d"], [["A B C D"]], lowercase=True)["score"] == pytest.approx(100.0)
    assert bleu(["a b c d"], [["A B C D"]])["score"] == 0.0  # negative control: case matters


def test_bleu_rejects_bad_input():
    with pytest.raises(UserError, match="hyp has 2 lines, ref has 1"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(UserError, match="unknown BLEU tokenizer 'intl'"):
        bleu(["a"], ["a"], tokenize="intl")
    with pytest.raises(UserError, match="no hypotheses"):
        bleu([], [])
    with pytest.raises(UserError, match="non-empty list"):
        bleu(["a"], [[]])


# -- ROUGE by hand ---------------------------------------------------------------------

HYP = "The cat was found under the bed."
REF = "the cat was under the bed"


def test_rouge_hand_computed():
    out = rouge([HYP], [REF])
    assert out["rouge1"] == pytest.approx({"p": 6 / 7, "r": 1.0, "f": 12 / 13})
    assert out["rouge2"] == pytest.approx({"p": 4 / 6, "r": 4 / 5, "f": 2 * (4 / 6) * 0.8 / (4 / 6 + 0.8)})
    assert out["rougeL"] == pytest.approx({"p": 6 / 7, "r": 1.0, "f": 12 / 13})


def test_rouge_averages_items_and_handles_empty_text():
    out = rouge([HYP, ""], [REF, "anything"], types=["rouge1", "rougeL"])
    assert out["rouge1"]["f"] == pytest.approx(12 / 13 / 2)
    assert out["rougeL"]["r"] == pytest.approx(0.5)


def test_rouge_char_mode_scores_chinese():
    assert rouge_tokens("我爱北京。") == []  # the default tokenizer drops CJK entirely
    assert rouge_tokens("我爱北京。", "char") == ["我", "爱", "北", "京"]
    out = rouge(["我爱北京"], ["我爱上海"], types=["rouge1", "rouge2"], tokenize="char")
    assert out["rouge1"]["f"] == pytest.approx(0.5)
    assert out["rouge2"]["f"] == pytest.approx(1 / 3)


def test_rouge_rejects_unknown_type_and_tokenizer():
    with pytest.raises(UserError, match="unknown ROUGE type 'rougeLsum'"):
        rouge(["a"], ["a"], types=["rougeLsum"])
    with pytest.raises(UserError, match="unknown ROUGE tokenizer"):
        rouge(["a"], ["a"], tokenize="13a")


# -- perplexity ------------------------------------------------------------------------


def test_perplexity_and_nll_lines():
    assert perplexity(4 * math.log(10), 4) == pytest.approx(10.0)
    assert perplexity(1e6, 1) == math.inf
    assert nll_from_lines(["0.5", "", "1.5", "3.0 4"]) == (5.0, 6)
    with pytest.raises(UserError, match="line 2"):
        nll_from_lines(["0.5", "abc"])
    with pytest.raises(UserError, match="must be finite and >= 0"):
        nll_from_lines(["-1"])
    with pytest.raises(UserError, match="at least one token"):
        perplexity(1.0, 0)


# -- agreement with the reference libraries on real text ------------------------------


def _shakespeare_lines(n: int) -> list[str]:
    """Lines of real text: tiny Shakespeare, or the embedded default corpus without it."""
    from conftest import fallback_text, have_shakespeare
    text = CORPUS.read_text(encoding="utf-8") if have_shakespeare() else fallback_text()
    lines = [line.strip() for line in text.split("\n")]
    return [line for line in lines if len(line.split()) >= 3][:n]


def _perturb(line: str, rng: random.Random) -> str:
    """A deterministic 'system output': word drops, swaps, insertions, case and punctuation edits."""
    words = line.split()
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(words))
        if op == 0 and len(words) > 2:
            del words[i]
        elif op == 1 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 2:
            words.insert(i, rng.choice(["the", "and", "my", "lord", "3.5-4", "&quot;so&quot;"]))
        elif op == 3:
            words[i] = words[i].upper()
        elif op == 4:
            words[i] = words[i].rstrip(",.;:!?") + rng.choice([",", ";", "!", "?", " .", ""])
        elif op == 5:
            words[i] = words[i].lower()
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus_pairs():
    refs = _shakespeare_lines(400)
    rng = random.Random(2024)
    return [_perturb(r, rng) for r in refs], refs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tokenize", ["13a", "zh", "char", "none"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_matches_sacrebleu(corpus_pairs, tokenize, lowercase):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = corpus_pairs
    ours = bleu(hyps, refs, tokenize=tokenize, lowercase=lowercase)
    theirs = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize, lowercase=lowercase)
    assert 5 < ours["score"] < 95
    assert ours["score"] == pytest.approx(theirs.score, abs=0.01)
    assert ours["precisions"] == pytest.approx(theirs.precisions, abs=1e-9)
    assert (ours["sys_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)


@pytest.mark.timeout(120)
def test_bleu_multi_reference_matches_sacrebleu(corpus_pairs):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = corpus_pairs
    rng = random.Random(7)
    second = [_perturb(r, rng) if i % 3 else None for i, r in enumerate(refs)]  # some items: 1 ref
    ours = bleu(hyps, [[r] if s is None else [r, s] for r, s in zip(refs, second)])
    theirs = sacrebleu.corpus_bleu(hyps, [refs, second])
    assert ours["score"] == pytest.approx(theirs.score, abs=0.01)
    assert ours["ref_len"] == theirs.ref_len
    assert ours["score"] != pytest.approx(bleu(hyps, refs)["score"], abs=0.1)  # refs mattered


def _chinese_sentences(n: int) -> list[str]:
    rng = random.Random(11)
    hanzi = "我你他她们是的了在有一个不这人上中大为和国地到以说时要就出会可也对生能而子那得"
    pieces = list(hanzi) + ["，", "。", "！", "“", "”", "、", "GPU", "3.5-4", "ok,", " ", "（", "）"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(5, 25))) for _ in range(n)]


@pytest.mark.timeout(120)
def test_zh_matches_sacrebleu_tokenizer_and_score():
    pytest.importorskip("sacrebleu")
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    theirs_tok = TokenizerZh()
    probes = [f"a{chr(cp)}b" for cp in range(0x80, 0x10000) if not 0xD800 <= cp <= 0xDFFF]
    probes += [f"x{chr(cp)}y" for cp in (0x20000, 0x2A6D6, 0x2F800, 0x2FA1D, 0x1F600)]
    assert [tokenize_zh(p) for p in probes] == [theirs_tok(p) for p in probes]

    refs = _chinese_sentences(200)
    rng = random.Random(5)
    hyps = ["".join(c for c in r if rng.random() > 0.15) for r in refs]
    ours = bleu(hyps, refs, tokenize="zh")["score"]
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, abs=0.01)


@pytest.mark.timeout(120)
def test_rouge_matches_rouge_score(corpus_pairs):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyps, refs = corpus_pairs
    types = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=False)
    per_item = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    ours = rouge(hyps, refs, types=types)
    for t in types:
        for key, attr in (("f", "fmeasure"), ("p", "precision"), ("r", "recall")):
            expected = sum(getattr(s[t], attr) for s in per_item) / len(per_item)
            assert ours[t][key] == pytest.approx(expected, abs=1e-4)
    assert 0.3 < ours["rouge2"]["f"] < ours["rouge1"]["f"] < 1.0

    # several references: the best F-measure per item, as score_multi
    rng = random.Random(3)
    others = [_perturb(r, rng) for r in refs[:100]]
    multi = rouge(hyps[:100], [[r, o] for r, o in zip(refs[:100], others)], types=types)
    for t in types:
        expected = sum(scorer.score_multi([r, o], h)[t].fmeasure
                       for h, r, o in zip(hyps[:100], refs[:100], others)) / 100
        assert multi[t]["f"] == pytest.approx(expected, abs=1e-4)
