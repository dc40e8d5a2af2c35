"""The backend runs a suite of modules exactly like eager (fp32 and bf16, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerances, yirage_compile

import yirage_dynamo


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))).softmax(-1)


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


class NormSoftmax(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(24)

    def forward(self, x):
        y = self.ln(x)
        return torch.log_softmax(y, dim=-1) + y.softmax(dim=1)


class MaskedAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        manual = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
        manual = manual.softmax(-1) @ v
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return manual + fused


class InplaceViews(torch.nn.Module):
    def forward(self, x):
        y = x.clone()
        y[:, 1:3] *= 2
        y.t_()
        z = y.transpose(0, 1).reshape(-1)
        z.add_(1)
        row = y[1]
        row.mul_(-1)  # mutation through a view of y
        return y, z[::2]


class StaticCacheWrite(torch.nn.Module):
    """Writes into a persistent buffer with index_copy_, like HF's StaticCache."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 16, 8))

    def forward(self, k, pos):
        self.cache.index_copy_(2, pos, k)
        return self.cache.sum(dim=2) * 1.0


class IntBool(torch.nn.Module):
    def forward(self, ids, flags):
        shifted = (ids * 3 + 7) % 11
        picked = torch.where(flags, shifted, -ids)
        return picked.cumsum(-1), (picked > 2).any(-1), picked.argmax(-1)


class MultiAliasedOutputs(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return y, y.view(-1), y[0], x.t(), (y + 1).sum()


class RandomOps(torch.nn.Module):
    def forward(self, x):
        return F.dropout(x, p=0.3, training=True) + torch.rand_like(x)


FLOAT_CASES = {
    "mlp": (MLP, lambda dt: (torch.randn(4, 16, dtype=dt),)),
    "conv_bn": (ConvBN, lambda dt: (torch.randn(2, 3, 8, 8, dtype=dt),)),
    "norm_softmax": (NormSoftmax, lambda dt: (torch.randn(3, 5, 24, dtype=dt),)),
    "masked_attention": (
        MaskedAttention,
        lambda dt: (
            torch.randn(2, 6, 32, dtype=dt),
            torch.ones(6, 6, dtype=torch.bool).tril(),
        ),
    ),
    "inplace_views": (InplaceViews, lambda dt: (torch.randn(4, 6, dtype=dt),)),
    "multi_aliased_outputs": (MultiAliasedOutputs, lambda dt: (torch.randn(3, 4, dtype=dt),)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_module_matches_eager(case, dtype):
    cls, make_inputs = FLOAT_CASES[case]
    torch.manual_seed(0)
    model = cls().to(dtype).eval()
    inputs = make_inputs(dtype)
    with torch.no_grad():
        expected = model(*inputs)
        actual = yirage_compile(model)(*inputs)
    torch.testing.assert_close(actual, expected, **tolerances(dtype))
    report = yirage_dynamo.last_report()
    assert report is not None and not report.fallbacks


def test_non_contiguous_and_broadcast_inputs_match_eager():
    def fn(x, y):
        return torch.tanh(x) * y + x.sum(-1, keepdim=True)

    x = torch.randn(6, 8).t()  # non-contiguous
    y = torch.randn(1, 6)  # broadcast along dim 0
    torch.testing.assert_close(yirage_compile(fn)(x, y), fn(x, y))


def test_input_mutation_into_buffer_is_preserved():
    torch.manual_seed(0)
    eager, compiled_mod = StaticCacheWrite(), StaticCacheWrite()
    compiled = yirage_compile(compiled_mod)
    for step in range(3):
        k = torch.randn(1, 2, 1, 8)
        pos = torch.tensor([step])
        torch.testing.assert_close(compiled(k, pos), eager(k, pos))
    torch.testing.assert_close(compiled_mod.cache, eager.cache)
    counts = {p.name: p.matches for p in yirage_dynamo.last_report().passes}
    assert counts["reinplace_input_mutations"] == 1


def test_user_tensor_argument_mutation_is_visible_to_caller():
    def fn(buf, x):
        buf.add_(x)
        return buf * 2

    a, b = torch.randn(5), torch.randn(5)
    a2 = a.clone()
    out = yirage_compile(fn)(a, b)
    expected = fn(a2, b)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(a, a2)


def test_integer_and_bool_tensors_match_eager():
    ids = torch.randint(-20, 20, (3, 7))
    flags = torch.rand(3, 7) > 0.5
    model = IntBool()
    actual = yirage_compile(model)(ids, flags)
    for a, e in zip(actual, model(ids, flags)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e)


def test_random_ops_follow_the_manual_seed_like_eager():
    model = RandomOps()
    x = torch.randn(64, 64)
    compiled = yirage_compile(model)
    torch.manual_seed(123)
    actual = compiled(x)
    torch.manual_seed(123)
    expected = model(x)
    torch.testing.assert_close(actual, expected)
    torch.manual_seed(124)
    assert not torch.allclose(compiled(x), expected)


def test_aliased_outputs_keep_aliasing():
    x = torch.randn(3, 4)
    y, flat, row, xt, _ = yirage_compile(MultiAliasedOutputs())(x)
    assert flat.data_ptr() == y.data_ptr()
    assert xt.data_ptr() == x.data_ptr()
    flat[0] = 100.0
    assert y[0, 0].item() == 100.0
