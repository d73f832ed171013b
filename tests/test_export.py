"""``hpcps export``: the safetensors writer, the GPT-2 mapping (loss and logits parity with
``transformers.GPT2LMHeadModel`` when it is installed), the npz format, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hpcps.checkpoint import open_checkpoint
from hpcps.cli import main
from hpcps.data.safetensors import read_safetensors, write_safetensors
from hpcps.export import hf_gpt2, npz
from hpcps.inference.gpt import load_gpt
from hpcps.model.gpt import GPT

TEXT = ("It was the best of times, it was the worst of times; it was the age of wisdom, "
        "it was the age of foolishness.\n") * 60
TRAIN = ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
         "train.batch_size=4", "train.max_steps=4", "train.eval_every=0", "train.eval_steps=1",
         "train.log_every=2", "train.peak_flops=1e12", "train.warmup_steps=1"]
# two shapes GPT-2 can hold: nanoGPT's default, and GPT-2's own (biases, here untied, on BPE)
VARIANTS = {
    "tied_nobias_char": ("char", []),
    "untied_bias_bpe": ("bpe", ["model.bias=true", "model.tie_embeddings=false",
                                "model.dropout=0.1"]),
}


def train(root, name: str, tokenizer: str, overrides: list) -> str:
    from hpcps.data.prepare import prepare
    src = root / "text.txt"
    if not src.exists():
        src.write_text(TEXT, encoding="utf-8")
    corpus = root / f"{name}.h5"
    vocab = {"vocab_size": 300} if tokenizer == "bpe" else {}
    prepare([str(src)], str(corpus), tokenizer=tokenizer, quiet=True, **vocab)
    run = root / name
    proc = subprocess.run([sys.executable, "-m", "hpcps", "train", f"data.path={corpus}",
                           f"out_dir={run}", *TRAIN, *overrides], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    return {name: train(root, name, tok, extra) for name, (tok, extra) in VARIANTS.items()}


def cli(capsys, *argv) -> tuple:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- safetensors -------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
               "half": rng.standard_normal(7).astype(np.float16),
               "ids": np.arange(4, dtype=np.int64).reshape(2, 2),
               "scalar": np.float32(2.5).reshape(())}
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, tensors, {"format": "pt"})
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    assert header_len % 8 == 0
    back, meta = read_safetensors(path)
    assert meta == {"format": "pt"} and list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)
    assert os.path.getsize(path) == 8 + header_len + sum(v.nbytes for v in tensors.values())
    st = pytest.importorskip("safetensors.numpy")   # the reference reader, when installed
    for name, value in st.load_file(path).items():
        assert np.array_equal(value, tensors[name])


def test_gpt2_state_dict_names_and_orientation():
    model = GPT(vocab_size=10, n_layer=2, n_head=2, n_embd=4, block_size=6, bias=False,
                tie_embeddings=False, threads=1)
    params = model.init_params(0)
    got = hf_gpt2.gpt2_tensors(model, params)
    block = {"ln_1.weight": (4,), "ln_1.bias": (4,), "attn.c_attn.weight": (4, 12),
             "attn.c_attn.bias": (12,), "attn.c_proj.weight": (4, 4), "attn.c_proj.bias": (4,),
             "ln_2.weight": (4,), "ln_2.bias": (4,), "mlp.c_fc.weight": (4, 16),
             "mlp.c_fc.bias": (16,), "mlp.c_proj.weight": (16, 4), "mlp.c_proj.bias": (4,)}
    want = {"transformer.wte.weight": (10, 4), "transformer.wpe.weight": (6, 4),
            **{f"transformer.h.{i}.{k}": v for i in range(2) for k, v in block.items()},
            "transformer.ln_f.weight": (4,), "transformer.ln_f.bias": (4,),
            "lm_head.weight": (10, 4)}
    assert {k: v.shape for k, v in got.items()} == want
    views = model.layout.views(params)
    assert np.array_equal(got["transformer.h.1.attn.c_attn.weight"], views["h1.attn.qkv.w"].T)
    assert not got["transformer.h.0.mlp.c_fc.bias"].any()        # bias=False -> zeros
    assert hf_gpt2.layer_norm_eps() == 1e-5


# -- Hugging Face parity -----------------------------------------------------------------------
def hf_logits(directory: str, x: np.ndarray) -> np.ndarray:
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(directory)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_gpt2_export_gives_the_same_loss(runs, variant, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    code, stdout, err = cli(capsys, "export", runs[variant], "--format", "hf-gpt2", "-o", out)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: ")
    loaded = load_gpt(runs[variant])
    model = loaded.model
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == 16
    assert config["tie_word_embeddings"] == model.tie_embeddings
    assert config["vocab_size"] == model.vocab_size

    x = np.random.default_rng(1).integers(0, model.vocab_size, size=(3, 16))
    theirs = hf_logits(out, x)
    ours = model.logits(loaded.params, x)
    assert np.abs(theirs - ours).max() < 1e-4
    y = np.roll(x, -1, axis=1)
    logp = theirs - np.log(np.exp(theirs.astype(np.float64)).sum(-1, keepdims=True))
    hf_loss = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert hf_loss == pytest.approx(model.loss(loaded.params, x, y), rel=1e-5)
    # negative control: the likeliest mapping slip (a Conv1D weight left as (out, in); square
    # here, so it loads) must break the parity checked above
    path = os.path.join(out, "model.safetensors")
    mapped, meta = read_safetensors(path)
    tensors = {k: np.array(v) for k, v in mapped.items()}    # copies: the file is rewritten
    del mapped
    name = "transformer.h.0.attn.c_proj.weight"
    tensors[name] = tensors[name].T
    write_safetensors(path, tensors, meta)
    assert np.abs(hf_logits(out, x) - ours).max() > 1e-3

    if variant.endswith("bpe"):          # the BPE definition is usable by `tokenizers` directly
        from tokenizers import Tokenizer
        sentence = "It was the age of wisdom."
        hf_ids = Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode(sentence).ids
        assert hf_ids == loaded.tokenizer.encode(sentence).tolist()


# -- npz ---------------------------------------------------------------------------------------
def test_npz_export_holds_every_named_tensor_and_the_config(runs, tmp_path, capsys):
    run = runs["untied_bias_bpe"]
    code, out, err = cli(capsys, "export", run, "--format", "npz", "-o", str(tmp_path / "m"))
    assert code == 0, err
    path = tmp_path / "m.npz"                     # the suffix is added
    ck = open_checkpoint(run)
    flat = ck.params()
    with np.load(path, allow_pickle=False) as data:
        names = [spec["name"] for spec in ck.manifest["layout"]]
        assert sorted(data.files) == sorted(names + ["config.json", "tokenizer.json"])
        for spec in ck.manifest["layout"]:
            value = data[spec["name"]]
            size = int(np.prod(spec["shape"]))
            assert value.dtype == np.float32 and list(value.shape) == spec["shape"]
            assert np.array_equal(value.ravel(), flat[spec["offset"]:spec["offset"] + size])
        assert "lm_head.w" in data.files and "h1.mlp.fc.b" in data.files
    tensors, meta, tokenizer = npz.load(str(path))
    assert meta["config"] == ck.config.as_dict() and meta["step"] == ck.step == 4
    assert meta["describe"]["workload"] == "gpt" and tokenizer == ck.tokenizer_json()
    assert sum(v.size for v in tensors.values()) == ck.n_params


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_export_refuses_unrepresentable_or_existing_output(runs, tmp_path, capsys):
    syn = tmp_path / "syn"
    proc = subprocess.run([sys.executable, "-m", "hpcps", "train", "workload=synthetic",
                           "synthetic.n_params=100", "train.max_steps=1", f"out_dir={syn}",
                           "train.peak_flops=1e12"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, out, err = cli(capsys, "export", str(syn), "--format", "hf-gpt2", "-o",
                         str(tmp_path / "hf"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "'synthetic'" in err and "not a GPT" in err
    assert not (tmp_path / "hf").exists()
    code, _, err = cli(capsys, "export", str(syn), "--format", "npz", "-o", str(tmp_path / "s"))
    assert code == 0, err
    tensors, meta, tokenizer = npz.load(str(tmp_path / "s.npz"))
    assert sum(v.size for v in tensors.values()) == 100
    assert meta["describe"]["workload"] == "synthetic" and tokenizer is None

    run = runs["tied_nobias_char"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "export", run, "--format", "hf-gpt2", "-o", str(target))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert os.listdir(target) == ["keep.txt"]
    code, _, err = cli(capsys, "export", run, "--format", "hf-gpt2", "-o", str(target),
                       "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "hpcps_tokenizer.json",
                                          "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out", "s.npz", "syn"]    # no temporary left over
