"""The whole-graph cache (runtime/graph_cache.py): a graph compiled before is reused
without AOTAutograd, passes or code generation, re-armed with the new model's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tolerances
from llm_models import VOCAB, build

import yirage_dynamo


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compile(model):
    return torch.compile(
        model, backend="yirage", options={"fallback": "error", "graph_cache": True}
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


_REARMED = "re-armed (the program of a repeated block earlier in this graph)"


def test_same_architecture_other_weights_hits_and_matches_its_own_eager(cache_dir):
    ids = torch.randint(0, VOCAB, (1, 9))
    first = build("llama")
    yirage_dynamo.clear_reports()
    _logits(_compile(first), ids)
    # Compiled by layers (regional): the distinct pieces are stored, the repeats re-armed.
    stored = [r.graph_cache for r in yirage_dynamo.reports()]
    assert "stored" in stored and set(stored) <= {"stored", _REARMED}, stored

    torch._dynamo.reset()
    torch.manual_seed(123)
    other = build("llama")
    for p in other.parameters():  # different weights, same shapes
        p.data.normal_(0, 0.05)
    expected = _logits(other, ids)
    yirage_dynamo.clear_reports()
    got = _logits(_compile(other), ids)
    reports = yirage_dynamo.reports()
    assert "hit" in [r.graph_cache for r in reports]
    assert all(r.graph_cache in ("hit", _REARMED) for r in reports)
    assert all("aot_autograd" not in r.stages and "passes" not in r.stages for r in reports)
    # Restored from the entries: one q/k/v fusion per layer.
    assert sum(r.patterns.get("horizontal_gemm.qkv", 0) for r in reports) == 2
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))
    # Horizontal GEMM fusion re-pointed the new model's q/k/v weights at one buffer again:
    attn = other.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    torch.testing.assert_close(_logits(other, ids), expected)  # eager values unchanged


def test_corrupted_entry_is_ignored_and_rewritten(cache_dir):
    ids = torch.randint(0, VOCAB, (1, 5))
    model = build("llama", layers=1)
    expected = _logits(model, ids)
    _logits(_compile(model), ids)
    (entry,) = (cache_dir / "graphs").glob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:-50])
    torch._dynamo.reset()
    torch.testing.assert_close(_logits(_compile(model), ids), expected, **tolerances(torch.float32))
    assert yirage_dynamo.last_report().graph_cache == "stored"


def test_graphs_that_need_the_full_pipeline_are_not_cached(cache_dir):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8)
    # dynamic shapes: the entry could not install the shape guards compilation adds
    f = torch.compile(
        lambda t: lin(t).relu(), backend="yirage", dynamic=True, options={"graph_cache": True}
    )
    with torch.no_grad():
        f(x)
    assert yirage_dynamo.last_report().graph_cache.startswith("not used: ")
    torch._dynamo.reset()
    # training: gradients flow through AOTAutograd's runtime
    g = torch.compile(lambda t: lin(t).relu(), backend="yirage", options={"graph_cache": True})
    g(x).sum().backward()
    assert "training" in yirage_dynamo.reports()[-2].graph_cache or any(
        "training" in r.graph_cache for r in yirage_dynamo.reports()
    )
    torch._dynamo.reset()
    h = torch.compile(lambda t: lin(t).relu(), backend="yirage", options={"graph_cache": False})
    with torch.no_grad():
        h(x)
    assert yirage_dynamo.last_report().graph_cache == "not used: graph_cache=False"


_CHILD = textwrap.dedent(
    """
    import json, torch, yirage_dynamo
    from yirage_dynamo.runtime import cpp_build
    calls = []
    real = cpp_build.run_compiler
    cpp_build.run_compiler = lambda argv: calls.append(argv) or real(argv)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32))
    def fn(x, q, k, v):  # SDPA becomes yirage::attention: entries must load in a new process
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return m(x), o
    x, q, k, v = torch.randn(4, 16), torch.randn(1, 4, 1, 8), *torch.randn(2, 1, 2, 5, 8)
    with torch.no_grad():
        got = torch.compile(fn, backend="yirage", options={"fallback": "error"})(x, q, k, v)
        torch.testing.assert_close(got, fn(x, q, k, v))
    r = yirage_dynamo.last_report()
    print(json.dumps({"calls": len(calls), "graph_cache": r.graph_cache, "patterns": r.patterns,
                      "stages": sorted(r.stages), "kernels": len(r.kernels)}))
    """
)


def test_new_process_reuses_the_graph_without_tracing_or_compiling(tmp_path):
    env = dict(os.environ, YIRAGE_CACHE_DIR=str(tmp_path / "c"), YIRAGE_GRAPH_CACHE="1")

    def child() -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = child()
    assert first["graph_cache"] == "stored" and first["calls"] >= 1
    assert first["patterns"].get("attention") == 1
    second = child()
    assert second["graph_cache"] == "hit" and second["calls"] == 0
    assert "aot_autograd" not in second["stages"] and "graph_cache" in second["stages"]
    assert second["kernels"] == first["kernels"] > 0
