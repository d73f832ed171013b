"""``hpcps import --format hf-gpt2``: a Hugging Face GPT-2 directory as a run directory.

Parity with ``transformers`` (skipped without it): the imported model's ``hpcps eval`` is
``GPT2LMHeadModel``'s loss on the same tokens, greedy sampling picks the same tokens, and
``hpcps export`` gives back every tensor bit for bit (tied and untied heads, one file and
shards, tokenizer.json and vocab.json + merges.txt). Without PyTorch: the same round trip
on a directory hpcps exported, and every refusal (pickle only, another model type, another
GELU or epsilon, a missing or misshapen tensor, a damaged file, no tokenizer): one line,
exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from pretrained_util import (
    FINETUNE_TEXT,
    PRETRAIN_TEXT,
    hpcps_gpt2_dir,
    prepare_text,
    same_bits,
    state_dict,
    transformers_gpt2_dir,
)
from train_util import cli, one_line_error

from hpcps.checkpoint import open_checkpoint
from hpcps.data.safetensors import read_safetensors, write_safetensors
from hpcps.inference.gpt import eval_windows, load_gpt

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GPT-2 directory that hpcps trained and exported (no PyTorch needed)."""
    return hpcps_gpt2_dir(tmp_path_factory.mktemp("exported"))


def import_ok(capsys, source, out) -> str:
    code, stdout, err = cli(capsys, "import", source, "--format", "hf-gpt2", "-o", out)
    assert code == 0, err
    return stdout


# -- the round trip without transformers ----------------------------------------------------------
def test_import_then_export_gives_back_every_tensor(exported, tmp_path, capsys):
    run = tmp_path / "run"
    stdout = import_ok(capsys, exported, run)
    assert f"-> {run} (checkpoint {run}/checkpoints/step_00000000)" in stdout
    assert f"hpcps prepare TEXT_FILES --tokenizer-file {run}/tokenizer.json" in stdout
    assert sorted(os.listdir(run)) == ["checkpoints", "config.toml", "tokenizer.json"]
    assert (run / "tokenizer.json").read_bytes() == (exported / "tokenizer.json").read_bytes()
    ck = open_checkpoint(str(run))
    assert ck.step == 0 and ck.manifest["optimizer"] == "none" and ck.manifest["state_names"] == []
    assert ck.manifest["imported"]["format"] == "hf-gpt2"
    m = ck.config.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias, m.tie_embeddings) == \
        (2, 2, 32, 32, True, True)
    # the imported weights are the trained run's, to the bit
    trained = open_checkpoint(str(exported.parent / "pretrain_run")).params()
    assert ck.params().tobytes() == trained.tobytes()
    out = tmp_path / "back"
    code, _, err = cli(capsys, "export", run, "--format", "hf-gpt2", "-o", out)
    assert code == 0, err
    before, after = state_dict(exported), state_dict(out)
    assert sorted(before) == sorted(after)
    assert all(same_bits(before[k], after[k]) for k in before)


def test_eval_and_sample_use_the_import(exported, tmp_path, capsys):
    run = tmp_path / "run"
    import_ok(capsys, exported, run)
    corpus = prepare_text(PRETRAIN_TEXT, run / "tokenizer.json", tmp_path / "c.h5")
    code, out, err = cli(capsys, "eval", run, "--data", corpus, "--json")
    assert code == 0, err
    imported = json.loads(out)["loss"]
    code, out, err = cli(capsys, "eval", exported.parent / "pretrain_run", "--data",
                         exported.parent / "pretrain.h5", "--json")
    assert code == 0, err
    assert imported == pytest.approx(json.loads(out)["loss"], abs=1e-6)
    assert imported < np.log(load_gpt(str(run)).model.vocab_size) - 0.5   # trained, not random
    code, out, err = cli(capsys, "sample", run, "--prompt", "it was the", "--max-new-tokens", "8",
                         "--temperature", "0")
    assert code == 0 and out.startswith("it was the"), err


def test_transformers_naming_variants_import_alike(exported, tmp_path, capsys):
    """A GPT2Model saves its tensors without 'transformer.'; older versions saved the causal
    mask buffers too: both import to the same weights."""
    tensors, _ = read_safetensors(str(exported / "model.safetensors"))
    bare = {k[len("transformer."):]: np.array(v) for k, v in tensors.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), dtype=np.float32))
    bare["h.1.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    other = tmp_path / "bare"
    shutil.copytree(exported, other)
    write_safetensors(str(other / "model.safetensors"), bare)
    import_ok(capsys, exported, tmp_path / "a")
    import_ok(capsys, other, tmp_path / "b")
    a, b = open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b"))
    assert a.params().tobytes() == b.params().tobytes()


# -- refusals ---------------------------------------------------------------------------------
def _variant(exported, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(exported, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, change):
    path = str(directory / "model.safetensors")
    mapped, meta = read_safetensors(path)
    tensors = {k: np.array(v) for k, v in mapped.items()}
    del mapped
    change(tensors)
    write_safetensors(path, tensors, meta)


def _truncate(directory):
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def _pickle_only(directory):
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


def _sharded_missing(directory):
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "transformer.wte.weight": "model-00001-of-00002.safetensors",
        "transformer.h.0.ln_1.weight": "model-00002-of-00002.safetensors"}}))


REFUSALS = {
    "pickle_only": (_pickle_only, ["pytorch_model.bin", "safetensors only",
                                   "save_pretrained", "safe_serialization=True"]),
    "model_type": (lambda d: _edit_config(d, model_type="llama"),
                   ["model_type 'llama' is not supported", "gpt2"]),
    "activation": (lambda d: _edit_config(d, activation_function="gelu"),
                   ["activation_function 'gelu'", "tanh"]),
    "epsilon": (lambda d: _edit_config(d, layer_norm_epsilon=1e-6), ["layer_norm_epsilon 1e-06"]),
    "inner": (lambda d: _edit_config(d, n_inner=64), ["n_inner 64 is not 4 x n_embd (128)"]),
    "shape": (lambda d: _edit_config(d, n_positions=64),
              ["tensor transformer.wpe.weight has shape (32, 32)", "needs (64, 32)"]),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("transformer.ln_f.bias")),
                       ["lacks tensor transformer.ln_f.bias"]),
    "extra_tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"transformer.h.0.crossattention.c_attn.weight": np.zeros((32, 64), np.float32)})),
        ["holds tensor transformer.h.0.crossattention.c_attn.weight"]),
    "untied_head_differs": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"] + 1})),
        ["lm_head.weight differs from transformer.wte.weight", "tie_word_embeddings"]),
    "truncated": (_truncate, ["model.safetensors: tensor", "truncated or damaged"]),
    "missing_shard": (_sharded_missing, ["lists shard 'model-00002-of-00002.safetensors'"]),
    "no_config": (lambda d: (d / "config.json").unlink(), ["config.json is missing"]),
    "no_tokenizer": (lambda d: (d / "tokenizer.json").unlink(),
                     ["has no tokenizer (tokenizer.json, or vocab.json + merges.txt)"]),
    "vocab_size": (lambda d: _edit_config(d, vocab_size=400),
                   ["tensor transformer.wte.weight has shape"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_directories_are_refused_in_one_line(exported, tmp_path, capsys, case):
    change, fragments = REFUSALS[case]
    source = _variant(exported, tmp_path, "model")
    change(source)
    out = tmp_path / "run"
    err = one_line_error(*cli(capsys, "import", source, "--format", "hf-gpt2", "-o", out))
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(os.listdir(tmp_path)) == ["model"]          # nothing written, no temporary


def test_tokenizer_and_model_vocabularies_must_agree(exported, tmp_path, capsys):
    source = _variant(exported, tmp_path, "model")
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 320, "content": "<|pad|>"})
    (source / "tokenizer.json").write_text(json.dumps(spec))
    err = one_line_error(*cli(capsys, "import", source, "--format", "hf-gpt2", "-o",
                              tmp_path / "run"))
    assert "the tokenizer (tokenizer.json) has 321 tokens but the model's vocabulary has 320" in err
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_existing_output_is_kept_unless_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = one_line_error(*cli(capsys, "import", exported, "--format", "hf-gpt2", "-o", out))
    assert "already exists" in err and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"]
    code, _, err = cli(capsys, "import", exported, "--format", "hf-gpt2", "-o", out, "--overwrite")
    assert code == 0, err
    assert "keep.txt" not in os.listdir(out)
    err = one_line_error(*cli(capsys, "import", tmp_path / "nowhere", "--format", "hf-gpt2",
                              "-o", tmp_path / "r2"))
    assert "model directory" in err and "does not exist" in err


def test_resuming_from_an_import_is_refused(exported, tmp_path, capsys):
    from pretrained_util import hpcps
    run = tmp_path / "run"
    import_ok(capsys, exported, run)
    corpus = prepare_text(FINETUNE_TEXT, run / "tokenizer.json", tmp_path / "c.h5")
    proc = hpcps("train", f"data.path={corpus}", f"out_dir={tmp_path / 'ft'}",
                 f"train.resume={run}/checkpoints/step_00000000", "model.bias=true",
                 "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds weights only" in proc.stderr and "train.init_from=" in proc.stderr


# -- parity with transformers -----------------------------------------------------------------------
VARIANTS = {"tied": {}, "untied_sharded": {"tie": False, "shard": True},
            "vocab_merges": {"vocab_merges": True}}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_equals_transformers(variant, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    source = transformers_gpt2_dir(tmp_path, **VARIANTS[variant])
    if variant == "untied_sharded":
        assert (source / "model.safetensors.index.json").exists()
        assert not (source / "model.safetensors").exists()
    run = tmp_path / "run"
    stdout = import_ok(capsys, source, run)
    assert ("vocab.json + merges.txt" in stdout) == (variant == "vocab_merges")
    corpus = prepare_text(FINETUNE_TEXT, run / "tokenizer.json", tmp_path / "c.h5")
    code, out, err = cli(capsys, "eval", run, "--data", corpus, "--json")
    assert code == 0, err
    ours = json.loads(out)

    from hpcps.data.corpus import Corpus
    with Corpus.open(str(corpus)) as c:
        tokens = np.asarray(c.split("val").read(0, c.split("val").n_tokens), dtype=np.int64)
    model = transformers.GPT2LMHeadModel.from_pretrained(str(source)).eval()
    nll = 0.0
    with torch.no_grad():
        for start, length in eval_windows(len(tokens), 32):
            x = torch.from_numpy(tokens[start:start + length][None])
            y = torch.from_numpy(tokens[start + 1:start + length + 1])
            logits = model(x).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    theirs = nll / (len(tokens) - 1)
    assert ours["tokens"] == len(tokens) - 1
    assert abs(ours["loss"] - theirs) <= 1e-4, (ours["loss"], theirs)
    # negative control: the same check tells a model of the same shape from this one
    untrained = transformers.GPT2LMHeadModel(model.config).eval()
    with torch.no_grad():
        x = torch.from_numpy(tokens[:33][None])
        other = torch.nn.functional.cross_entropy(untrained(x[:, :32]).logits[0], x[0, 1:33])
    assert abs(other.item() - theirs) > 0.1

    # greedy sampling picks transformers' argmax continuation
    prompt = "it was the age"
    code, out, err = cli(capsys, "sample", run, "--prompt", prompt, "--max-new-tokens", "10",
                         "--temperature", "0")
    assert code == 0, err
    loaded = load_gpt(str(run))
    ids = torch.tensor([loaded.tokenizer.encode(prompt).tolist()])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.rstrip("\n") == loaded.tokenizer.decode(greedy[0].numpy())

    back = tmp_path / "back"
    code, _, err = cli(capsys, "export", run, "--format", "hf-gpt2", "-o", back)
    assert code == 0, err
    before, after = state_dict(source), state_dict(back)
    if VARIANTS[variant].get("tie", True):
        before.pop("lm_head.weight", None)            # a tied head is wte (saved or not)
    assert sorted(before) == sorted(after)
    assert all(same_bits(before[k], after[k]) for k in before)
