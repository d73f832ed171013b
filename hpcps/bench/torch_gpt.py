"""PyTorch reference GPT with exactly the tensors of ``hpcps.model.gpt.build_layout``.

Used by the speed bench (eager PyTorch baseline) and the parity test (same
weights in, loss and every gradient compared). Same math as the NumPy model:
pre-LayerNorm blocks, causal scaled-dot-product attention, tanh-GELU, LM head
tied to ``wte`` unless ``tie_embeddings=False``. Import only where torch is
installed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcps.model.gpt import build_layout


class TorchGPT(nn.Module):
    def __init__(self, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 block_size: int, bias: bool = False, dropout: float = 0.0,
                 tie_embeddings: bool = True, dtype=torch.float32) -> None:
        super().__init__()
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.dropout, self.tie_embeddings = dropout, tie_embeddings
        self.layout = build_layout(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd,
                                   block_size=block_size, bias=bias,
                                   tie_embeddings=tie_embeddings)
        self.tensors: dict[str, nn.Parameter] = {}
        for spec in self.layout.specs:
            param = nn.Parameter(torch.zeros(spec.shape, dtype=dtype))
            self.register_parameter(spec.name.replace(".", "_"), param)
            self.tensors[spec.name] = param

    # -- flat-buffer exchange ----------------------------------------------------------

    def load_flat(self, flat: np.ndarray) -> None:
        views = self.layout.views(np.asarray(flat))
        with torch.no_grad():
            for name, param in self.tensors.items():
                param.copy_(torch.from_numpy(np.ascontiguousarray(views[name])))

    def flat_grads(self) -> np.ndarray:
        out = np.zeros(self.layout.total, dtype=np.float64)
        for spec in self.layout.specs:
            grad = self.tensors[spec.name].grad
            if grad is not None:
                out[spec.offset:spec.end] = grad.detach().double().reshape(-1).numpy()
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay exactly the tensors the layout marks (2-D weights), like nanoGPT."""
        decay = [self.tensors[s.name] for s in self.layout.specs if s.decay]
        rest = [self.tensors[s.name] for s in self.layout.specs if not s.decay]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]

    # -- model -------------------------------------------------------------------------

    def _p(self, name: str):
        return self.tensors.get(name)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.shape
        c, h = self.n_embd, self.n_head
        drop = self.dropout if self.training else 0.0
        x = F.embedding(idx, self._p("wte")) + self._p("wpe")[:t]
        x = F.dropout(x, drop, self.training)
        for i in range(self.n_layer):
            p = f"h{i}."
            a = F.layer_norm(x, (c,), self._p(p + "ln1.w"), self._p(p + "ln1.b"), 1e-5)
            qkv = F.linear(a, self._p(p + "attn.qkv.w"), self._p(p + "attn.qkv.b"))
            q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in qkv.split(c, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
            y = y.transpose(1, 2).reshape(b, t, c)
            y = F.linear(y, self._p(p + "attn.proj.w"), self._p(p + "attn.proj.b"))
            x = x + F.dropout(y, drop, self.training)
            m = F.layer_norm(x, (c,), self._p(p + "ln2.w"), self._p(p + "ln2.b"), 1e-5)
            m = F.gelu(F.linear(m, self._p(p + "mlp.fc.w"), self._p(p + "mlp.fc.b")),
                       approximate="tanh")
            m = F.linear(m, self._p(p + "mlp.proj.w"), self._p(p + "mlp.proj.b"))
            x = x + F.dropout(m, drop, self.training)
        x = F.layer_norm(x, (c,), self._p("lnf.w"), self._p("lnf.b"), 1e-5)
        head = self._p("wte") if self.tie_embeddings else self._p("lm_head.w")
        logits = F.linear(x, head)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)
        return logits, loss
