"""Continuous batching over a paged KV cache, on a random-weight RoPE GQA model (CPU, seconds).

Six requests of different prompt lengths and budgets share three slots and a pool of pages
smaller than three full sequences: each step prints which request holds each slot, the pages in
use and the queue; a finished request's pages go back to the pool and a waiting one takes its
slot. At the end every request's tokens are printed and checked against generating it alone.

    python examples/continuous_batching.py [--max-batch 3] [--page-size 16] [--num-pages 8]
"""

import argparse

import torch

from pytorch_mqa import GPT, GPTConfig, generate
from pytorch_mqa.model.serving import ContinuousBatcher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batch", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                       pos_embedding="rope")
    model = GPT(config).eval()
    with torch.no_grad():  # wider than GPT-2's init, so greedy tokens depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(args.seed)
    lengths, budgets = (5, 40, 12, 3, 25, 9), (20, 8, 30, 12, 16, 24)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]

    engine = ContinuousBatcher(model, max_batch=args.max_batch, page_size=args.page_size, num_pages=args.num_pages)
    ids = [engine.submit(p, n) for p, n in zip(prompts, budgets)]
    print(f"{len(ids)} requests, {args.max_batch} slots, {args.num_pages} pages of {args.page_size} rows "
          f"(a full sequence of {config.block_size} rows needs {-(-config.block_size // args.page_size)})")
    step = 0
    while engine.busy:
        r = engine.step()
        step += 1
        occ = engine.occupancy()
        slots = " ".join("--" if s is None else f"r{s}" for s in occ["slots"])
        events = "".join([f" +r{i}" for i in r.admitted] + [f" -r{i}" for i in r.finished])
        print(f"step {step:3d} | slots [{slots}] | pages {occ['pages_used']:2d}/{occ['num_pages']} used"
              f" | waiting {occ['waiting']} |{events}")
    ok = True
    for rid, p, n in zip(ids, prompts, budgets):
        out = engine.outputs[rid]
        alone = generate(model, [p], n, temperature=0)[0]
        ok &= out == alone
        print(f"r{rid}: prompt {len(p):2d} tokens -> {len(out):2d} new: {out[:12]}{' ...' if len(out) > 12 else ''}"
              f"  {'== generate alone' if out == alone else '!= generate alone'}")
    print("all requests equal generating them alone" if ok else "MISMATCH against generating alone")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
