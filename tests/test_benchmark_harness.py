"""The CUDA benchmark's interleaved A/Bs compile every variant on one model in one
process. Dynamo reuses a compiled graph for any backend that compares equal, so variants
that differ only by an environment switch need backends of their own, or each would
time the first one's program (RESULTS.md, seventeenth session)."""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


def test_every_yirage_variant_of_the_cuda_benchmark_compiles_its_own_program():
    pytest.importorskip("transformers")
    from bench_cuda_llama import ENV_VARIANTS, variant_configs

    configs = variant_configs({})
    names = ["yirage", *ENV_VARIANTS]
    wrappers = {
        n: torch._TorchCompileWrapper(configs[n].backend, configs[n].mode, configs[n].options, None)
        for n in names
    }
    for a, b in itertools.combinations(names, 2):
        assert wrappers[a] != wrappers[b], (a, b)


def test_equal_backends_share_dynamos_compiled_code():
    """The mechanism itself, so that a torch upgrade that changes it shows here."""
    compiles = []

    def backend(gm, example_inputs, **kwargs):
        compiles.append(1)
        return gm.forward

    def f(x):
        return x + 1

    x = torch.ones(3)
    torch.compile(f, backend=backend, options={"k": 1})(x)
    torch.compile(f, backend=backend, options={"k": 1})(x)
    assert len(compiles) == 1
    torch.compile(f, backend=functools.partial(backend), options={"k": 1})(x)
    assert len(compiles) == 2
