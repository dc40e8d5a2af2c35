"""Symbolic sizes flow through: one compile serves many sequence lengths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters


class LlamaLikeBlock(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm_w = torch.nn.Parameter(torch.ones(dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        self.gate = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.rms(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, d))
        h = self.rms(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def test_llama_block_runs_ten_lengths_without_recompiling():
    torch.manual_seed(0)
    model = LlamaLikeBlock().eval()
    compiled = torch.compile(
        model, backend="yirage", dynamic=True, options={"fallback": "error", "verify": True}
    )
    counters.clear()
    with torch.no_grad():
        for seq in range(3, 13):
            x = torch.randn(2, seq, 32)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
