import sys, torch
sys.path.insert(0, "tests")
from llm_models import build
from yirage_dynamo import reports, clear_reports
for name, attn, dt in [("llama", "sdpa", torch.bfloat16), ("bert", "sdpa", torch.float32), ("gemma", "sdpa", torch.float32)]:
    torch._dynamo.reset(); clear_reports()
    m = build(name, attn, dtype=dt).cuda()
    ids = torch.randint(1, 128, (2, 8), device="cuda")
    kw = {} if name == "bert" else {"use_cache": False}
    c = torch.compile(m, backend="yirage", options={"fallback": "error", "debug": True, "debug_dir": f"{sys.argv[1]}/{name}"})
    with torch.no_grad():
        d = (c(ids, **kw).logits.float() - m(ids, **kw).logits.float()).abs().max().item()
    for r in reports():
        print(name, attn, dt, "maxdiff", d, r.kind, r.lowering, [p.name for p in r.passes])
