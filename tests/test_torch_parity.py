"""Parity of the NumPy GPT with PyTorch autograd on identical weights (fp32), and a
smoke run of the model bench.

Metric, per parameter tensor: max|ours - torch| / max|torch| (max-abs error
relative to the tensor's largest gradient entry) must be <= 1e-4; the loss must
agree to 1e-5 relative. Skipped when torch is not installed.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from hpcps.model.gpt import GPT

torch = pytest.importorskip("torch")
from hpcps.bench.torch_gpt import TorchGPT  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NANOGPT = dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64)


def relative_errors(ours: np.ndarray, theirs: np.ndarray, layout) -> dict:
    out = {}
    for s in layout.specs:
        a, b = ours[s.offset:s.end].astype(np.float64), theirs[s.offset:s.end]
        out[s.name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    return out


@pytest.mark.parametrize("bias,tie,t,noise", [
    (False, True, 64, 0.0),      # nanoGPT CPU config at init
    (False, True, 64, 0.1),      # weights moved off init: larger scores and activations
    (True, False, 50, 0.1),      # biases, untied head, T < block_size
])
def test_loss_and_every_gradient_match_torch(bias, tie, t, noise):
    torch.manual_seed(0)
    model = GPT(**NANOGPT, bias=bias, tie_embeddings=tie)
    params = model.init_params(1337)
    rng = np.random.default_rng(0)
    params += (rng.standard_normal(params.size) * noise).astype(np.float32)
    idx = rng.integers(0, 65, (6, t))
    targets = rng.integers(0, 65, (6, t))
    targets[1, :7] = -1
    grads = np.empty_like(params)
    loss = model.forward_backward(params, grads, idx, targets)

    ref = TorchGPT(**NANOGPT, bias=bias, tie_embeddings=tie)
    ref.load_flat(params)
    _, ref_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    errors = relative_errors(grads, ref.flat_grads(), model.layout)
    assert len(errors) == len(model.layout.specs)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: {errors[worst]:.3g}"
    logits = model.logits(params, idx)
    ref_logits, _ = ref(torch.from_numpy(idx))
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 64)])
def test_logits_match_torch_for_any_prompt_length(shape):
    """Sampling starts from one token: T = 1 must work and agree too."""
    model = GPT(**NANOGPT, bias=True)
    params = model.init_params(3)
    idx = np.random.default_rng(2).integers(0, 65, shape)
    ref = TorchGPT(**NANOGPT, bias=True)
    ref.load_flat(params)
    expected = ref(torch.from_numpy(idx))[0].detach().numpy()
    np.testing.assert_allclose(model.logits(params, idx), expected, rtol=1e-4, atol=1e-5)


def test_parity_metric_catches_a_wrong_gradient():
    """Negative control: one corrupted tensor is reported, the rest are not."""
    model = GPT(**NANOGPT)
    params = model.init_params(1)
    idx = np.random.default_rng(1).integers(0, 65, (2, 16))
    grads = np.empty_like(params)
    model.forward_backward(params, grads, idx, idx)
    ref = TorchGPT(**NANOGPT)
    ref.load_flat(params)
    ref(torch.from_numpy(idx), torch.from_numpy(idx))[1].backward()
    spec = model.layout["h2.mlp.fc.w"]
    grads[spec.offset:spec.end] *= 1.01
    errors = relative_errors(grads, ref.flat_grads(), model.layout)
    assert errors["h2.mlp.fc.w"] > 1e-3
    assert max(v for k, v in errors.items() if k != "h2.mlp.fc.w") <= 1e-4


def _bench_args(**kw) -> argparse.Namespace:
    from hpcps.bench import model as bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["model.n_layer=1", "model.n_embd=32", "model.block_size=16",
                              "train.batch_size=2", "--steps", "2", "--repeats", "2",
                              "--warmup", "1"])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_model_bench_smoke(capsys):
    from hpcps.bench import model as bench
    res = bench.run_model_bench(_bench_args(torch=True, profile=True))
    assert res["tokens_per_step"] == 32 and len(res["ratio_per_repeat"]) == 2
    assert res["ratio"] > 0 and res["ours_tokens_per_s"] > 0 and res["torch_tokens_per_s"] > 0
    assert "linear_forward" in res["profile_ms_per_step"]
    assert bench.run(_bench_args(torch=False, json=True)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "ratio" not in printed and printed["config"]["n_embd"] == 32


def test_model_bench_rejects_bad_counts():
    from hpcps.bench import model as bench
    from hpcps.errors import UserError
    with pytest.raises(UserError, match="--steps"):
        bench.run_model_bench(_bench_args(steps=0))
