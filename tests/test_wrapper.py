"""The generated wrapper: collapsed view chains give eager's values and layouts."""

from __future__ import annotations

import torch
from conftest import yirage_compile


def test_static_view_chain_becomes_one_as_strided_with_eager_values(tmp_path):
    w = torch.randn(96, 32)

    def fn(x):
        y = x @ w.t()
        q = y[:, :64].view(2, 5, 4, 16).transpose(1, 2)[:, :2]
        k = y[:, 64:].view(2, 5, 2, 16).permute(0, 2, 3, 1)
        return q @ k, q  # the views feed an extern GEMM and escape as an output

    x = torch.randn(10, 32)
    with torch.no_grad():
        out = yirage_compile(fn, debug=True, debug_dir=str(tmp_path))(x)
        expected = fn(x)
    for a, e in zip(out, expected):
        torch.testing.assert_close(a, e)
        assert a.stride() == e.stride()
    (wrapper,) = tmp_path.rglob("wrapper_*.py")
    assert ".as_strided(" in wrapper.read_text()


def test_transposed_reshape_feeding_a_gemm_matches_eager():
    def fn(x, w):
        # transpose makes x non-contiguous, so reshape copies: not a view of x.
        return x.transpose(1, 2).reshape(2, 9, -1).view(18, -1) @ w

    x, w = torch.randn(2, 4, 9, 16), torch.randn(64, 8)
    torch.testing.assert_close(yirage_compile(fn)(x, w), fn(x, w))


def test_view_chain_base_stays_alive_until_the_chain_ends():
    from torch.fx.experimental.proxy_tensor import make_fx
    from yirage_dynamo.runtime.wrapper import build_wrapper

    def fn(x, w):
        y = x @ w
        a = y[:, :64].view(2, 5, 4, 16)  # the chain starts before y's other use ...
        z = torch.exp(y)  # ... which would otherwise be y's last use ...
        return a.transpose(1, 2).contiguous(), z  # ... and ends here, reading y

    x, w = torch.randn(10, 32), torch.randn(32, 96)
    gm = make_fx(fn, tracing_mode="fake")(x, w)
    run = build_wrapper(gm, None, kernels={})
    assert ".as_strided(" in run.source
    for got, want in zip(run([x, w]), fn(x, w)):
        torch.testing.assert_close(got, want)
