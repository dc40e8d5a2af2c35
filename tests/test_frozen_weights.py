"""Two models of one architecture in one process: Dynamo reuses the first one's compiled
code for the second (its guards check parameter metadata, not identity), so a program
with frozen weights must notice the other weights (yirage_dynamo/frozen_weights.py)."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from conftest import needs_triton

from yirage_dynamo.frozen_weights import FrozenWeightsGuard, guard_frozen_weights
from yirage_dynamo.options import parse_options


class _Mlp(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _guards() -> list[FrozenWeightsGuard]:
    return [o for o in gc.get_objects() if type(o) is FrozenWeightsGuard]


def test_second_model_of_the_same_architecture_computes_with_its_own_weights():
    # Guards of earlier tests' programs may still be alive (a CUDA-graph runner of the
    # same process holds its program): this test's guard is the one it made.
    gc.collect()
    before = {id(g) for g in _guards()}
    a, b = _Mlp(0).eval(), _Mlp(1).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
        ca, cb = torch.compile(a, backend="yirage"), torch.compile(b, backend="yirage")
        torch.testing.assert_close(ca(x), want_a)
        torch.testing.assert_close(cb(x), want_b)  # was a's output before the guard
        torch.testing.assert_close(ca(x), want_a)  # and back: both programs are kept
        torch.testing.assert_close(cb(x + 1), b(x + 1))
    mine = [g for g in _guards() if id(g) not in before]
    assert len(mine) == 1, f"{len(mine)} new guards, {len(before)} from earlier tests"
    (guard,) = mine
    assert guard.recompiles == 1 and len(guard.programs) == 2


def test_weights_of_a_deleted_model_are_not_kept_alive():
    a, b = _Mlp(0).eval(), _Mlp(1).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.compile(a, backend="yirage")(x)
        weight = weakref.ref(a.up.weight)
        del a
        gc.collect()
        cb = torch.compile(b, backend="yirage")
        torch.testing.assert_close(cb(x), b(x))
    # The compiled program may still hold the frozen tensors, never the Parameter objects.
    assert weight() is None


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[needs_triton, pytest.mark.cuda])]
)
def test_hf_generate_of_two_llamas_matches_each_ones_eager(device):
    """On CUDA: the guard in front of the CUDA-graph runner, whose frozen embedding and
    head pieces would otherwise replay the first model's weights."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256,
    )  # fmt: skip
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(cfg).to(device).eval())
    ids = torch.randint(0, 256, (1, 8), device=device)
    gen = dict(
        max_new_tokens=5, do_sample=False, cache_implementation="static",
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    cc = transformers.CompileConfig(
        backend="yirage", mode=None, fullgraph=False, options={"fallback": "error"}
    )
    cc._compile_all_devices = True  # HF compiles on CPU only when asked
    with torch.no_grad():
        refs = [m.generate(ids, **gen) for m in models]
        outs = [m.generate(ids, compile_config=cc, **gen) for m in models]
        again = models[0].generate(ids, compile_config=cc, **gen)  # the first one's program
    assert not torch.equal(refs[0].sequences, refs[1].sequences)  # else this checks nothing
    for out, ref in zip([*outs, again], [*refs, refs[0]]):
        assert torch.equal(out.sequences, ref.sequences)
        for got, want in zip(out.logits, ref.logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_graph_with_symbolic_sizes_runs_other_weights_uncompiled(caplog):
    a, b = _Mlp(0).eval(), _Mlp(1).eval()
    with torch.no_grad():
        ca = torch.compile(a, backend="yirage", dynamic=True)
        cb = torch.compile(b, backend="yirage", dynamic=True)
        ca(torch.randn(3, 16))
        x = torch.randn(5, 16)
        with caplog.at_level(logging.WARNING, logger="yirage_dynamo"):
            torch.testing.assert_close(cb(x), b(x))
        cb(x)
    assert any(g.dynamic for g in _guards())  # Dynamo made the batch size symbolic
    assert caplog.text.count("symbolic sizes") == 1  # said once, not per call


def test_no_guard_without_freezing_or_parameters():
    gm = torch.fx.symbolic_trace(_Mlp(0))
    x, p = torch.randn(2, 16), torch.nn.Parameter(torch.randn(2))
    compiled = object()

    def never(*args):
        raise AssertionError("not called")

    off = parse_options({"freeze": False})
    assert guard_frozen_weights(compiled, gm, [x, p], off, never) is compiled
    assert guard_frozen_weights(compiled, gm, [x], parse_options({}), never) is compiled
    with torch.no_grad():  # inference: freezing applies
        guarded = guard_frozen_weights(compiled, gm, [x, p], parse_options({}), never)
    assert isinstance(guarded, FrozenWeightsGuard) and guarded.positions == [1]
