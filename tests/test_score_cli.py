"""``hpcps score``: outputs, JSON, exit codes and one-line errors."""

import json
import math
import re
import subprocess
import sys

import pytest

from hpcps.cli import main


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def score(capsys, *argv):
    code = main(["score", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path):
    hyp = write(tmp_path / "hyp.txt", "a b c d e\nthe cat\n")
    ref = write(tmp_path / "ref.txt", "a b c d f g\nthe cat\r\n")  # CRLF ends a line too
    return hyp, ref


def test_bleu_human_and_json(capsys, files):
    hyp, ref = files
    code, out, err = score(capsys, "--metric", "bleu", "--hyp", hyp, "--ref", ref)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("BLEU: ") and lines[-1] == "items: 2"
    code, out, _ = score(capsys, "--metric", "bleu", "--hyp", hyp, "--ref", ref, "--json")
    result = json.loads(out)
    assert code == 0 and result["metric"] == "bleu" and result["items"] == 2
    assert result["counts"] == [6, 4, 2, 1] and result["totals"] == [7, 5, 3, 2]
    assert float(lines[0].split()[1]) == pytest.approx(result["score"], abs=0.005)


def test_accuracy_and_prf1(capsys, tmp_path):
    hyp = write(tmp_path / "pred.txt", "cat\ndog\ndog\ndog\ncat\n")
    ref = write(tmp_path / "gold.txt", "cat\ncat\ndog\ndog\nbird\n")
    code, out, _ = score(capsys, "--metric", "accuracy", "--hyp", hyp, "--ref", ref)
    assert code == 0 and out.splitlines()[0] == "accuracy: 0.6000 (3/5)"
    code, out, _ = score(capsys, "--metric", "prf1", "--hyp", hyp, "--ref", ref, "--json")
    result = json.loads(out)
    assert result["f1"] == pytest.approx((0 + 0.5 + 0.8) / 3)
    assert result["per_label"]["bird"]["precision"] == 0.0
    code, out, _ = score(capsys, "--metric", "prf1", "--hyp", hyp, "--ref", ref, "--average", "micro")
    assert "f1 (micro): 0.6000" in out.splitlines()


def test_rouge_with_char_tokenizer(capsys, tmp_path):
    hyp = write(tmp_path / "h.txt", "我爱北京\n")
    ref = write(tmp_path / "r.txt", "我爱上海\n")
    code, out, _ = score(capsys, "--metric", "rouge", "--hyp", hyp, "--ref", ref, "--json")
    assert code == 0 and json.loads(out)["rouge1"]["f"] == 0.0  # rouge-score's tokenizer sees nothing
    code, out, _ = score(capsys, "--metric", "rouge", "--hyp", hyp, "--ref", ref,
                         "--tokenize", "char", "--rouge-types", "rouge1")
    assert code == 0 and out.splitlines()[0] == "rouge1 F: 0.5000  (P 0.5000, R 0.5000)"


def test_perplexity_from_both_line_formats(capsys, tmp_path):
    per_token = write(tmp_path / "nll.txt", "".join(f"{math.log(10)}\n" for _ in range(4)))
    code, out, _ = score(capsys, "--metric", "perplexity", "--hyp", per_token)
    assert code == 0 and out.splitlines()[0] == "perplexity: 10.0000"
    sums = write(tmp_path / "sums.txt", f"{2 * math.log(5)} 2\n{3 * math.log(5)} 3\n")
    code, out, _ = score(capsys, "--metric", "perplexity", "--hyp", sums, "--json")
    result = json.loads(out)
    assert result["perplexity"] == pytest.approx(5.0) and result["n_tokens"] == 5


@pytest.mark.parametrize("make_args, message", [
    (lambda h, r, t: ["--metric", "bleu", "--hyp", h, "--ref", r], "hyp has 10 lines, ref has 12"),
    (lambda h, r, t: ["--metric", "bleu", "--hyp", str(t / "missing.txt"), "--ref", r],
     "hyp file .*missing.txt does not exist"),
    (lambda h, r, t: ["--metric", "bleu", "--hyp", write(t / "empty.txt", ""), "--ref", r],
     "hyp file .*empty.txt is empty"),
    (lambda h, r, t: ["--metric", "bleu", "--hyp", h, "--ref", write(t / "latin.txt", b"caf\xe9\n")],
     "ref file .*latin.txt is not UTF-8 text \\(bad byte at offset 3\\)"),
    (lambda h, r, t: ["--metric", "bleu", "--hyp", str(t), "--ref", r], "is a directory"),
    (lambda h, r, t: ["--metric", "rouge", "--hyp", h], "--metric rouge needs --ref FILE"),
    (lambda h, r, t: ["--metric", "perplexity", "--hyp", h, "--ref", r], "reads only --hyp"),
    (lambda h, r, t: ["--metric", "perplexity", "--hyp", h], "hyp.txt line 1: expected 'NLL'"),
    (lambda h, r, t: ["--metric", "accuracy", "--hyp", h, "--ref", r, "--lowercase"],
     "--lowercase applies to --metric bleu only"),
    (lambda h, r, t: ["--metric", "rouge", "--hyp", h, "--ref", r, "--tokenize", "13a"],
     "supports --tokenize char only"),
    (lambda h, r, t: ["--metric", "rouge", "--hyp", h, "--ref", r, "--rouge-types", "rouge0"],
     "unknown ROUGE type 'rouge0'"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, make_args, message):
    hyp = write(tmp_path / "hyp.txt", "".join(f"word {i}\n" for i in range(10)))
    ref = write(tmp_path / "ref.txt", "".join(f"word {i}\n" for i in range(12)))
    code, out, err = score(capsys, *make_args(hyp, ref, tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("hpcps: error: ")
    assert re.search(message, err), err


@pytest.mark.timeout(60)
def test_line_count_mismatch_in_a_real_process(tmp_path):
    hyp = write(tmp_path / "hyp.txt", "x\n" * 10)
    ref = write(tmp_path / "ref.txt", "x\n" * 12)
    proc = subprocess.run([sys.executable, "-m", "hpcps", "score", "--metric", "bleu",
                           "--hyp", hyp, "--ref", ref], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "hpcps: error: hyp has 10 lines, ref has 12\n"


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["score", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "example:\n  hpcps score --metric bleu" in out
