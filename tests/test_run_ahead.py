"""Run-ahead decoding (runtime/run_ahead.py): the next decode step started on a side
stream from predicted inputs, handed out only when the caller's inputs equal them.

The rule learning is checked on CPU tensors; the runner itself needs a GPU (CUDA graphs,
streams) and skips cleanly without one."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_cuda, needs_triton
from yirage_dynamo.runtime.run_ahead import _grown, _predict, _rules_that_held

# --------------------------------------------------------------------------- rules (CPU)


def test_rules_learned_from_one_decode_transition():
    vocab, slots = 11, 8
    logits = torch.zeros(1, 1, vocab)
    logits[..., 9] = 1.0  # no other input holds 9: only the ids match the token rule
    token = logits[:, -1].argmax(-1)
    prev = [
        torch.tensor([[4]]),  # ids
        torch.tensor([[5]]),  # position
        torch.arange(slots).reshape(1, 1, 1, slots) <= 5,  # padding mask
        torch.tensor(6),  # cache counter, after the step's increment
    ]
    now = [
        token.reshape(1, 1),
        torch.tensor([[6]]),
        torch.arange(slots).reshape(1, 1, 1, slots) <= 6,
        torch.tensor(6),
    ]
    held = _rules_that_held(now, prev, [token])
    assert ("token", 0) in held[0]
    assert held[1] == {("step", 1)}
    assert ("grow",) in held[2] and ("carry",) not in held[2]
    assert held[3] == {("carry",)}


def test_rules_find_nothing_for_an_input_no_rule_explains():
    prev = [torch.tensor([[1, 5, 2]]), torch.tensor([[3]])]
    now = [torch.tensor([[7, 0, 2]]), torch.tensor([[9]])]
    held = _rules_that_held(now, prev, [torch.tensor([2])])
    assert held[0] == set()
    # One element always moved by some constant: the runner needs the same rule to hold
    # over two transitions before it keeps it.
    assert held[1] == {("step", 6)}


def test_snapshot_slots_hold_mixed_dtypes_and_compare_as_one_tensor():
    """The prediction and the caller's inputs are compared as one byte buffer: each copied
    input in an aligned slot of its own dtype, whatever the sizes before it."""
    from yirage_dynamo.runtime.cuda_graphs import _copy_groups, _copy_in
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    inputs = [
        torch.tensor([[4]]),  # ids
        torch.arange(7).reshape(1, 1, 1, 7) <= 3,  # a bool mask of odd length
        torch.tensor(6),  # a 0-dim counter, after 7 bytes of mask
        torch.tensor([2.5], dtype=torch.float32),  # not copied: stays out of the buffer
        torch.tensor([[5, 6]], dtype=torch.int32).t(),  # non-contiguous
    ]
    runner = RunAheadRunner(_decode_step)
    runner.buffers, runner.copied = [t.clone() for t in inputs], [0, 1, 2, 4]
    flat, views = runner._snapshot_slots()
    assert flat.dtype == torch.uint8 and flat.numel() == 8 + 8 + 8 + 8
    assert sorted(views) == [0, 1, 2, 4]
    _copy_in(_copy_groups(list(views.items())), inputs)
    for i, v in views.items():
        assert v.dtype == inputs[i].dtype and torch.equal(v, inputs[i])
    other, other_views = runner._snapshot_slots()
    other_slots = _copy_groups(list(other_views.items()))
    _copy_in(other_slots, inputs)
    assert torch.equal(flat, other)
    inputs[1][..., 4] = True
    _copy_in(other_slots, inputs)
    assert not torch.equal(flat, other)


def test_grown_mask_sets_the_slot_after_the_last_set_one_with_left_padding():
    mask = torch.tensor([[False, False, True, True, False, False]])
    assert _grown(mask).tolist() == [[False, False, True, True, True, False]]


def test_predict_applies_each_rule_in_place():
    logits = torch.tensor([[[0.1, 3.0, -1.0]]])
    ids, pos = torch.tensor([[0]]), torch.tensor([[4]])
    mask = torch.tensor([[True, True, False]])
    counter = torch.tensor(7)
    _predict(ids, ("token", 0), [logits])
    _predict(pos, ("step", 1), [logits])
    _predict(mask, ("grow",), [logits])
    _predict(counter, ("carry",), [logits])
    assert ids.tolist() == [[1]] and pos.tolist() == [[5]]
    assert mask.tolist() == [[True, True, True]] and counter.item() == 7


def test_run_ahead_option_is_validated(monkeypatch):
    from yirage_dynamo.options import parse_options

    monkeypatch.delenv("YIRAGE_RUN_AHEAD", raising=False)  # the default is the option's

    assert parse_options({"run_ahead": True}).run_ahead is True
    assert parse_options({}).run_ahead == "auto"
    assert parse_options({"run_ahead": False}).run_ahead is False
    assert parse_options({"run_ahead": "always"}).run_ahead == "always"
    assert parse_options({"run_ahead": "auto"}).run_ahead == "auto"
    with pytest.raises(ValueError, match="run_ahead.*'always' or 'auto'"):
        parse_options({"run_ahead": "yes"})


def test_run_ahead_env_takes_the_named_values(monkeypatch):
    from yirage_dynamo.options import parse_options

    for env, want in (("auto", "auto"), ("always", "always"), ("1", True), ("off", False)):
        monkeypatch.setenv("YIRAGE_RUN_AHEAD", env)
        assert parse_options({}).run_ahead == want
    assert parse_options({"run_ahead": True}).run_ahead is True  # the option wins


# --------------------------------------------------------------------------- runner (CUDA)

VOCAB, SLOTS, WIDTH = 16, 64, 8


def _decode_step(ids, pos, mask, cache, counter, table):
    """A decode-step stand-in with HF's inputs: writes the token's row at the cache
    counter, bumps the counter in place, attends over the masked cache."""
    row = table[ids.reshape(-1)] + pos.reshape(-1, 1).to(table.dtype)
    cache.index_copy_(0, counter.reshape(1), row)
    counter.add_(1)
    ctx = (cache * mask.reshape(-1, 1).to(cache.dtype)).sum(0, keepdim=True)
    return ((ctx @ table.T).unsqueeze(1),)


def _decode_loop(step, table, steps: int, choose=None):
    """HF's loop in miniature: next token from the logits (argmax unless `choose`), one
    host sync per token, position + 1, the mask grown by one slot."""
    cache = torch.zeros(SLOTS, WIDTH, device="cuda")
    counter = torch.tensor(3, device="cuda")
    for t in (cache, counter):
        torch._dynamo.mark_static_address(t)
    ids = torch.tensor([[5]], device="cuda")
    pos = torch.tensor([[3]], device="cuda")
    mask = torch.arange(SLOTS, device="cuda") <= 3
    logits_seen = []
    for k in range(steps):
        (logits,) = step(ids, pos, mask, cache, counter, table)
        logits_seen.append(logits)
        nxt = logits[:, -1].float().argmax(-1) if choose is None else choose(k, logits)
        assert nxt.max().item() >= 0  # HF's per-step stopping check: a host sync
        ids, pos, mask = nxt[:, None], pos + 1, _grown(mask)
    torch.cuda.synchronize()
    return logits_seen, cache, counter


def _runner():
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    return RunAheadRunner(_decode_step, mutated_inputs=frozenset({3, 4}), trial=False)


def _table():
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(VOCAB, WIDTH, device="cuda"), requires_grad=False)


def _assert_same_run(got, ref) -> None:
    (logits, cache, counter), (ref_logits, ref_cache, ref_counter) = got, ref
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b)
    # The counter the caller sees is its own: a step started ahead bumps only a private
    # copy until it is handed out.
    assert counter.item() == ref_counter.item()
    # The cache agrees wherever a step handed out wrote (the step started after the last
    # one may have written the next slot).
    n = ref_counter.item()
    torch.testing.assert_close(cache[:n], ref_cache[:n])


@needs_cuda
def test_run_ahead_hands_out_the_started_step_when_the_inputs_were_predicted():
    table = _table()
    runner = _runner()
    got = _decode_loop(runner, table, steps=14)
    runner.drain()
    ref = _decode_loop(_decode_step, table, steps=14)
    _assert_same_run(got, ref)
    # Call 1 eager, 2 captured, 2-4 observed (the rules fixed after call 4's replay), call
    # 5 starts the first step ahead; from call 6 on every step was handed out.
    assert runner.rules is not None and ("token", 0) in runner.rules
    assert (runner.hits, runner.misses) == (14 - 5, 0)


@needs_cuda
def test_run_ahead_decodes_to_the_caches_last_slot_without_writing_past_it():
    """Up to the cache's last slot (as HF's own static cache is sized): a step started
    after it would make ATen's index_copy_ fail a device assert, which ends the process."""
    table = _table()
    runner = _runner()
    got = _decode_loop(runner, table, steps=SLOTS - 3)
    ref = _decode_loop(_decode_step, table, steps=SLOTS - 3)
    _assert_same_run(got, ref)
    assert runner.launch_error is None and runner._started is None
    assert (runner.hits, runner.misses) == (SLOTS - 3 - 5, 0)


@needs_cuda
def test_run_ahead_drops_a_step_whose_inputs_were_not_the_predicted_ones():
    table = _table()

    def once_not_argmax(k, logits):
        best = logits[:, -1].float().argmax(-1)
        return (best + 1) % VOCAB if k == 8 else best

    runner = _runner()
    got = _decode_loop(runner, table, steps=20, choose=once_not_argmax)
    ref = _decode_loop(_decode_step, table, steps=20, choose=once_not_argmax)
    _assert_same_run(got, ref)
    assert runner.misses == 1 and runner.hits > 8


@needs_cuda
def test_run_ahead_stays_off_when_no_input_is_predictable():
    table = _table()

    def sampled(k, logits):
        return torch.tensor([(7 * k + 3) % VOCAB], device="cuda")

    runner = _runner()
    got = _decode_loop(runner, table, steps=10, choose=sampled)
    ref = _decode_loop(_decode_step, table, steps=10, choose=sampled)
    _assert_same_run(got, ref)
    assert runner.rules is None and runner.learn_failed
    assert runner.hits == runner.misses == 0


# --------------------------------------------------------------------------- HF generate


def _generate(model, ids, options: dict | None, new: int, cache=None):
    """generate() compiled with these yirage options (None: eager), into a new static
    cache, or into `cache` (a StaticCache passed back, as a chat's next turn does)."""
    import transformers

    from yirage_dynamo.backend import yirage

    gen = dict(max_new_tokens=new, do_sample=False, output_logits=True)
    gen.update(return_dict_in_generate=True)
    if cache is None:
        gen["cache_implementation"] = "static"
    else:
        gen["past_key_values"] = cache
    if options is None:
        return model.generate(ids, disable_compile=True, **gen)
    cc = transformers.CompileConfig(backend=yirage, mode=None, options=options)
    return model.generate(ids, compile_config=cc, **gen)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_generate_with_run_ahead_matches_eager(dtype):
    """HF static-cache generate() with run-ahead: eager's tokens and logits, most decode
    steps handed out from a step started ahead; then a second generate() right after the
    first (same cache, new prompt: the step started after the first one's last token is
    dropped, the new prefill rewrites the cache)."""
    from test_cuda_generate import _assert_matches_eager, _tiny_llama
    from yirage_dynamo.runtime.cuda_graphs import live_runners
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    import yirage_dynamo

    model = _tiny_llama(dtype)
    # Same cache length (prompt + new) for both calls: HF reuses the cache object.
    calls = [(torch.randint(3, 512, (1, 12), device="cuda"), 24)]
    calls.append((torch.randint(3, 512, (1, 20), device="cuda"), 16))
    yirage_dynamo.clear_reports()
    before = set(map(id, live_runners()))
    with torch.no_grad():
        for ids, new in calls:
            ref = _generate(model, ids, None, new)
            out = _generate(model, ids, {"fallback": "error", "run_ahead": "always"}, new)
            _assert_matches_eager(out, ref, ids.shape[1], dtype)
    mine = [r for r in live_runners() if id(r) not in before]
    runners = [r for r in mine if isinstance(r, RunAheadRunner) and r.hits]
    seen = [
        (type(r).__name__, r.calls, r.captures, getattr(r, "hits", None),
         getattr(r, "misses", None), getattr(r, "learn_failed", None), getattr(r, "rules", None))
        for r in mine
    ]  # fmt: skip
    print(seen)
    assert runners, seen
    # 23 + 15 decode calls: 4 to learn, the second call's first step dropped, a pause.
    assert sum(r.hits for r in runners) >= (24 - 6) + (16 - 6), seen
    assert sum(r.misses for r in runners) <= 1
    notes = [n for r in yirage_dynamo.reports() for n in r.notes]
    assert any("RunAheadRunner" in n or "run-ahead" in n for n in notes), notes


# --------------------------------------------------------------------------- runner logic (CPU)


class _FakeGraph:
    """A CUDA graph stand-in for CPU tests: "replay" reruns the captured step on the
    captured buffers and writes its results into the captured outputs. Streams and
    events are no-ops, so a step started ahead runs at once: what this checks is the
    bookkeeping (rules, hand-out or drop, the private counters), not the overlap."""

    capturing: _FakeGraph | None = None

    def __init__(self) -> None:
        self.recorded = None

    def replay(self) -> None:
        fn, args, outs = self.recorded
        for out, new in zip(outs, fn(*args), strict=True):
            out.copy_(new)


class _FakeCapture:
    def __init__(self, graph, pool=None) -> None:
        self.graph = graph

    def __enter__(self):
        _FakeGraph.capturing = self.graph

    def __exit__(self, *exc) -> None:
        _FakeGraph.capturing = None


class _NoOp:
    def __init__(self, *a, **k) -> None:
        self.device = "cpu"

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _recorded_step(*args):
    out = _decode_step(*args)
    if _FakeGraph.capturing is not None:
        _FakeGraph.capturing.recorded = (_decode_step, args, out)
    return out


@pytest.fixture
def fake_cuda(monkeypatch):
    for name, fake in [
        ("CUDAGraph", _FakeGraph),
        ("graph", _FakeCapture),
        ("graph_pool_handle", lambda: None),
        ("synchronize", lambda: None),
        ("Stream", _NoOp),
        ("Event", _NoOp),
        ("current_stream", lambda: _NoOp()),
        ("stream", _NoOp),
    ]:
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
    # A runner left with a step pending (kept alive by a reference cycle until the
    # collector runs) must not be drained by a later test's runner on real torch.cuda.
    from yirage_dynamo.runtime import cuda_graphs

    cuda_graphs._PENDING.clear()


def _cpu_loop(step, table, steps: int, choose=None, slots: int = SLOTS, grow: bool = True):
    cache, counter = torch.zeros(slots, WIDTH), torch.tensor(3)
    for t in (cache, counter):
        torch._dynamo.mark_static_address(t)
    ids, pos = torch.tensor([[5]]), torch.tensor([[3]])
    mask = torch.arange(slots) <= 3
    seen = []
    for k in range(steps):
        (logits,) = step(ids, pos, mask, cache, counter, table)
        seen.append(logits)
        nxt = logits[:, -1].argmax(-1) if choose is None else choose(k, logits)
        ids, pos, mask = nxt[:, None], pos + 1, (_grown(mask) if grow else mask.clone())
    return seen, cache, counter


def _cpu_table():
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(VOCAB, WIDTH), requires_grad=False)


def test_run_ahead_bookkeeping_hands_out_predicted_steps_and_keeps_counters_private(
    fake_cuda,
):
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    def once_not_argmax(k, logits):
        best = logits[:, -1].argmax(-1)
        return (best + 1) % VOCAB if k == 8 else best

    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    got = _cpu_loop(runner, table, 20, once_not_argmax)
    ref = _cpu_loop(_decode_step, table, 20, once_not_argmax)
    # Every step here ran to completion before the next call, the last one started ahead
    # included: the cache past the caller's counter holds its write, the counter does not.
    _assert_same_run(got, ref)
    assert runner.rules[0] == ("token", 0) and runner.rules[1] == ("step", 1)
    assert runner.rules[2] == ("grow",) and runner.rules[3] == ("carry",)
    # Calls 6-9 handed out (call 5 started the first step ahead), call 10 dropped (the
    # token was not the argmax), a pause of two calls, then calls 13-20.
    assert (runner.hits, runner.misses) == (12, 1)


def test_run_ahead_starts_no_step_past_the_caches_last_slot(fake_cuda):
    """HF sizes a static cache to the last position it decodes: the step after that one
    would write past the cache (ATen's index_copy_ raises on the CPU, fails a device assert
    on a GPU). The mask's last slot marks it, and no step starts there."""
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    # Positions 3..15 of a 16-slot cache: the last call is at the last slot.
    got = _cpu_loop(runner, table, 13, slots=16)
    _assert_same_run(got, _cpu_loop(_decode_step, table, 13, slots=16))
    assert runner.launch_error is None and runner._started is None
    assert (runner.hits, runner.misses) == (13 - 5, 0)


def test_run_ahead_never_starts_without_a_mask_marking_the_caches_end(fake_cuda):
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    got = _cpu_loop(runner, table, 10, grow=False)
    _assert_same_run(got, _cpu_loop(_decode_step, table, 10, grow=False))
    assert runner.rules is None and "cache's end" in runner.learn_failed
    assert runner.hits == runner.misses == 0


def test_run_ahead_never_starts_without_a_token_fed_back(fake_cuda):
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    def sampled(k, logits):
        return torch.tensor([(7 * k + 3) % VOCAB])

    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    _assert_same_run(
        _cpu_loop(runner, table, 10, sampled), _cpu_loop(_decode_step, table, 10, sampled)
    )
    assert runner.rules is None and "input 0" in runner.learn_failed
    assert runner.hits == runner.misses == 0


def test_run_ahead_keeps_its_rules_when_a_new_cache_is_captured(fake_cuda):
    """A second sequence on a new cache object (new static addresses: a re-capture, as
    HF's second generate() did on the H100): the rules still hold, so the new graph runs
    ahead from its first call (they were once re-learned against the calls counted since
    the first capture, and learning gave up)."""
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    _assert_same_run(_cpu_loop(runner, table, 14), _cpu_loop(_decode_step, table, 14))
    first = runner.hits
    _assert_same_run(_cpu_loop(runner, table, 14), _cpu_loop(_decode_step, table, 14))
    assert runner.captures == 2 and runner.learn_failed is None
    assert (first, runner.hits - first) == (9, 13)
    from yirage_dynamo.profiling import cuda_graph_stats

    (row,) = [r for r in cuda_graph_stats() if r["calls"] == runner.calls and r["captures"] == 2]
    assert row["runner"] == "RunAheadRunner" and row["handed_out"] == runner.hits
    assert row["rules"][0] == ("token", 0) and row["run_ahead_kept"] is True
    assert row["trials"] == 0  # trial=False: run ahead without one


def test_run_ahead_launch_that_fails_turns_it_off_without_failing_the_call(
    fake_cuda, monkeypatch, caplog
):
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    def broken(self, main):
        raise RuntimeError("no side stream here")

    monkeypatch.setattr(RunAheadRunner, "_launch", broken)
    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    _assert_same_run(_cpu_loop(runner, table, 10), _cpu_loop(_decode_step, table, 10))
    assert runner.choice is False and "no side stream" in runner.launch_error
    assert runner.hits == 0 and "run-ahead off" in caplog.text


def test_run_ahead_prediction_that_cannot_be_recorded_turns_it_off_and_says_why(
    fake_cuda, monkeypatch
):
    """The prediction is recorded as a CUDA graph on the first launch; where that fails,
    the capture state is reset, the calls run in order and the stats name the error."""
    from yirage_dynamo.runtime import run_ahead
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner, _as_graph

    from yirage_dynamo.profiling import cuda_graph_stats

    class FailingCapture:
        def __init__(self, graph, pool=None) -> None:
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc) -> None:
            return None

    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    monkeypatch.setattr(run_ahead, "_reset_capture_state", lambda: resets.append(1))
    with pytest.raises(RuntimeError, match="not permitted"):
        _as_graph(lambda: None)
    assert resets == [1]

    def unrecordable(fn):
        raise RuntimeError("prediction not capturable")

    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(run_ahead, "_as_graph", unrecordable)
    table = _cpu_table()
    runner = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    _assert_same_run(_cpu_loop(runner, table, 10), _cpu_loop(_decode_step, table, 10))
    assert runner.hits == 0 and runner.choice is False
    errors = [r.get("launch_error") or "" for r in cuda_graph_stats()]
    assert any("prediction not capturable" in e for e in errors), errors
