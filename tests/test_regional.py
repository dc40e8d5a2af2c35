"""Regional compilation: a model's repeated blocks compiled once (yirage_dynamo/regional.py),
checked against eager and against compiling the graph whole."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerances, yirage_compile
from llm_models import VOCAB, build
from yirage_dynamo.runtime import cpp_build

import yirage_dynamo
from yirage_dynamo import regional

pytestmark = [
    pytest.mark.skipif(cpp_build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.usefixtures("private_kernel_cache"),
]


def _dynamo_graph(model, *args):
    """The Dynamo graph (and example inputs) `torch.compile(model)` hands a backend."""
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    return seen[0]


def _plan(gm, inputs, **kw):
    with torch.no_grad():
        return regional.plan(gm, inputs, **kw)


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 2 * d)
        self.proj = torch.nn.Linear(d, d)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls.add_(1)  # input mutation inside every block
        a, b = self.fc(self.norm(x)).chunk(2, dim=-1)
        return x + self.proj(torch.nn.functional.gelu(a) * torch.sigmoid(b) * 0.5)


class Stack(torch.nn.Module):
    def __init__(self, d: int = 32, n: int = 5, transpose_out: bool = False) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(n))
        self.out = torch.nn.Linear(d, 8)
        self.transpose_out = transpose_out

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
            if self.transpose_out:
                # A non-contiguous value crosses every block boundary.
                h = h.transpose(0, 1).contiguous().transpose(0, 1)
        return self.out(h)


def test_plan_cuts_at_each_decoder_layer_and_moves_the_closing_residual_add():
    model = build("llama", layers=4)
    ids = torch.randint(0, VOCAB, (1, 6))
    gm, inputs = _dynamo_graph(model, ids)
    partition, why = _plan(gm, inputs)
    assert partition is not None, why
    runs: dict[int, list] = {}
    for node, r in partition.items():
        runs.setdefault(r, []).append(node)
    # embedding | layer 0 | layer 1 | layer 2 | layer 3 | final norm + head
    assert len(runs) == 6
    layers = [runs[r] for r in sorted(runs)][1:5]
    assert [regional.block_of(n[-1])[1] for n in layers] == [0, 1, 2, 3]
    # Layers 1..3 open with the previous layer's residual add and have one op sequence.
    ops = [tuple((n.op, str(n.target)) for n in run) for run in layers]
    assert ops[1] == ops[2] == ops[3] != ops[0]
    assert all(regional._is_add(run[0]) for run in layers[1:])
    assert regional.block_of(layers[1][0])[1] == 0
    # Without the move (the CPU's choice) all four layers are alike.
    with torch.no_grad():
        partition, _ = regional.plan(gm, inputs, move_closing_add=False)
    runs = {}
    for node, r in partition.items():
        runs.setdefault(r, []).append(node)
    layers = [runs[r] for r in sorted(runs)][1:5]
    assert len({tuple((n.op, str(n.target)) for n in run) for run in layers}) == 1


def test_block_step_counters_are_incremented_together_in_the_last_piece():
    """Each Block bumps its own counter; the bumps move after the head (one piece), the
    blocks stay alike, and the compiled model still counts every call."""
    model = Stack().eval()
    x = torch.randn(3, 32)
    gm, inputs = _dynamo_graph(model, x)
    partition, why = _plan(gm, inputs, defer_increments=True)
    assert partition is not None, why
    runs = regional._runs_of(partition)
    bumps = [n for n in partition if n.meta.get("yirage_deferred_increment")]
    assert len(bumps) == 5 and all(n in runs[-1] for n in bumps)
    assert runs[-1][-5:] == bumps  # after the head's nodes
    blocks = runs[1:-1]
    assert len(blocks) == 5 and len({tuple(regional._ops(run)) for run in blocks[1:]}) == 1
    # Without the move, each block keeps its own.
    gm, inputs = _dynamo_graph(Stack().eval(), x)
    with torch.no_grad():
        partition, _ = regional.plan(gm, inputs, defer_increments=False)
    assert not any(n.meta.get("yirage_deferred_increment") for n in partition)


def test_deferred_counter_increments_count_every_call_as_eager(monkeypatch):
    """Asked for (CUDA's default; here the benchmark switch), the increments run in the
    last piece; the compiled model still bumps every block's counter once per call."""
    from yirage_dynamo.regional_backend import DEFER_ENV

    monkeypatch.setenv(DEFER_ENV, "1")
    torch.manual_seed(0)
    model, ref = Stack().eval(), Stack().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 32)
    compiled = yirage_compile(model)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), ref(x))
    assert all(int(b.calls) == int(rb.calls) == 3 for b, rb in zip(model.blocks, ref.blocks))
    notes = yirage_dynamo.reports()[-1].notes
    assert "regional: 5 step-counter increments run in the last piece" in notes


def test_a_counter_read_after_its_increment_keeps_it_in_its_block():
    class Peek(Block):
        def forward(self, x):
            self.calls.add_(1)
            return super().forward(x) * self.calls  # read after the bump

    model = Stack()
    model.blocks = torch.nn.ModuleList(Peek(32) for _ in range(3))
    model.eval()
    x = torch.randn(3, 32)
    gm, inputs = _dynamo_graph(model, x)
    partition, why = _plan(gm, inputs, defer_increments=True)
    assert partition is not None, why
    assert not any(n.meta.get("yirage_deferred_increment") for n in partition)


def test_counters_sharing_one_storage_keep_their_increments_in_place():
    model = Stack().eval()
    counts = torch.zeros(5, dtype=torch.int64)
    for i, b in enumerate(model.blocks):
        b.calls = counts[i]  # views of one tensor: graph inputs that alias
    x = torch.randn(3, 32)
    gm, inputs = _dynamo_graph(model, x)
    partition, why = _plan(gm, inputs, defer_increments=True)
    assert partition is not None, why
    assert not any(n.meta.get("yirage_deferred_increment") for n in partition)


def test_first_layer_opens_with_a_zero_residual_so_every_layer_is_one_program(monkeypatch):
    model = build("llama", layers=4).eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    gm, inputs = _dynamo_graph(model, ids)
    code = gm.code
    partition, why = _plan(gm, inputs)
    assert partition is not None, why
    with torch.no_grad():
        undo = regional.open_first_block_with_zero_residual(gm, partition)
    assert undo is not None
    runs = regional._runs_of(partition)
    assert len(runs) == 6
    ops = [tuple(regional._ops(run)) for run in runs[1:5]]
    assert ops[0] == ops[1] == ops[2] == ops[3]
    zero = [n for n in runs[0] if n.target is torch.zeros_like]
    assert len(zero) == 1 and runs[1][0].args[1] is zero[0]
    undo()
    assert gm.code == code
    # Compiled (the CUDA plan forced on the CPU): one program for the four layers.
    monkeypatch.setenv("YIRAGE_REGIONAL_FUSE_ACROSS", "1")
    with torch.no_grad():
        expected = model(ids).logits
        got = yirage_compile(model)(ids).logits
    torch.testing.assert_close(got, expected)
    assert "regional: 6 pieces, 3 compiled, 3 reusing" in yirage_dynamo.reports()[-1].notes[-1]


def test_plan_declines_small_or_unrepeated_blocks_and_dynamic_or_training_graphs():
    lin = torch.nn.Linear(8, 8)
    gm, inputs = _dynamo_graph(lin, torch.randn(2, 8))
    assert _plan(gm, inputs) == (None, "no repeated blocks")
    # nn.Sequential's children are indexed too, but one-op blocks are not worth a split.
    seq = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4)))
    gm, inputs = _dynamo_graph(seq, torch.randn(2, 8))
    assert _plan(gm, inputs) == (None, "no two blocks alike")
    gm, inputs = _dynamo_graph(Stack(), torch.randn(3, 32))
    assert _plan(gm, inputs)[0] is not None
    assert _plan(gm, [*inputs[:-1], 7])[1] == "dynamic shapes"
    with torch.enable_grad():
        grad_inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        assert regional.plan(gm, grad_inputs)[1] == "graph may need gradients (training)"


@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_blocks_compile_once_and_match_eager(dtype, transpose_out):
    torch.manual_seed(0)
    model = Stack(transpose_out=transpose_out).to(dtype).eval()
    ref = Stack(transpose_out=transpose_out).to(dtype).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 32, dtype=dtype)
    compiled = yirage_compile(model)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), ref(x), **tolerances(dtype))
    # The in-place buffer update of every block happened once per call, as in eager.
    for b, rb in zip(model.blocks, ref.blocks):
        assert int(b.calls) == int(rb.calls) == 3
    reports = yirage_dynamo.reports()
    # On the CPU each layer's increment stays in its one-call kernel program.
    assert not any("step-counter" in n for n in reports[-1].notes)
    rearmed = [r for r in reports if r.graph_cache.startswith("re-armed")]
    if transpose_out:
        # inp | block 0 | views | block 1 | views | ... | block 4 | views + out: blocks
        # 2..4 re-arm block 1's program (block 0 reads a contiguous input, the others a
        # transposed one); a view piece returns a view of its own intermediate, which only
        # AOTAutograd's wrapper can rebuild, so each compiles on its own.
        assert len(reports) == 11 and len(rearmed) == 3
        assert "regional: 11 pieces, 8 compiled, 3 reusing" in reports[-1].notes[-1]
    else:
        # inp | blocks 0..4 (one program: on the CPU the closing add stays in its block,
        # so the first block is like the others) | out
        assert len(reports) == 7 and len(rearmed) == 4
        assert "regional: 7 pieces, 3 compiled, 4 reusing" in reports[-1].notes[-1]
        shared = reports[1]
        kernels = [k.name for k in shared.kernels]
        assert kernels and all([k.name for k in r.kernels] == kernels for r in rearmed)


def test_regional_off_compiles_one_graph():
    model = Stack().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
        got = yirage_compile(model, regional=False)(x)
    torch.testing.assert_close(got, expected)
    assert len(yirage_dynamo.reports()) == 1


def test_llama_generate_with_static_cache_matches_eager_and_whole_graph():
    """HF decode through regional pieces: same greedy tokens as eager and as the graph
    compiled whole; the per-layer KV cache writes land in each layer's own cache."""
    import transformers as tf

    model = build("llama", layers=4)
    ids = torch.randint(0, VOCAB, (1, 7))

    def generate(backend_options):
        kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
        if backend_options is None:
            kw["disable_compile"] = True
        else:
            cc = tf.CompileConfig(
                backend="yirage", fullgraph=False, mode=None, options=backend_options
            )
            cc._compile_all_devices = True
            kw["compile_config"] = cc
        with torch.no_grad():
            return model.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)

    eager = generate(None)
    regional_out = generate({"fallback": "error"})
    pieces = yirage_dynamo.reports()
    assert any(r.graph_cache.startswith("re-armed") for r in pieces)
    torch._dynamo.reset()
    whole = generate({"fallback": "error", "regional": False})
    assert torch.equal(regional_out.sequences, eager.sequences)
    assert torch.equal(whole.sequences, eager.sequences)
    for a, b in zip(regional_out.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "bert"])
def test_hf_families_compile_by_layers_and_match_eager(name):
    """Every family's 4 layers split into pieces sharing programs; logits as eager."""
    model = build(name, layers=4)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = {} if model.config.model_type == "bert" else {"use_cache": False}
    with torch.no_grad():
        expected = model(ids, **kw)
        got = yirage_compile(model)(ids, **kw)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    notes = [n for r in yirage_dynamo.reports() for n in r.notes if n.startswith("regional:")]
    assert len(notes) == 1, notes
    assert "reusing a repeated block's program" in notes[0] and " 0 reusing" not in notes[0]


def test_a_failing_split_plan_compiles_the_graph_whole(monkeypatch):
    def broken(*_args, **_kw):
        raise RuntimeError("plan failed")

    monkeypatch.setattr(regional, "plan", broken)
    model = Stack().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
        got = yirage_compile(model)(x)
    torch.testing.assert_close(got, expected)
    assert len(yirage_dynamo.reports()) == 1
