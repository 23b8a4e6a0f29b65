"""LM-Infinite demo: perplexity past the model's trained length, ``none`` vs ``lminfinite``.

The text is scored in chunks of ``--chunk`` tokens through a kvshrink cache (positions passed
explicitly), and perplexity is reported per segment of ``--segment`` tokens. With ``none`` every token
attends to the whole past, so relative distances beyond the trained length appear once the text is
longer than it; with ``lminfinite`` each query sees the first ``globals`` tokens (at a distance capped
at ``cap``) and the last ``local`` tokens, so distances stay inside the trained range.

    python examples/lminfinite_demo.py --model default --tokens 12288          # SmolLM2: trained on 8192
    python examples/lminfinite_demo.py --model default --tokens 4096 --trained 1024   # cheaper, see below

``--trained N`` pretends the model was trained on N tokens (sets LM-Infinite's local window and
distance cap from N); the ``none`` baseline still degrades only past the model's real trained length.
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvshrink.cache import make_cache  # noqa: E402


def segment_ppl(model, ids: torch.Tensor, spec: str, chunk: int, segment: int) -> tuple[list[float], list[int]]:
    cache = make_cache(model, spec)
    nll = torch.zeros(ids.shape[-1] - 1, dtype=torch.float64)
    held = []
    with torch.no_grad():
        for s in range(0, ids.shape[-1] - 1, chunk):
            e = min(s + chunk, ids.shape[-1] - 1)
            logits = model(ids[:, s:e], past_key_values=cache, position_ids=torch.arange(s, e)[None]).logits
            logp = torch.log_softmax(logits[0].float(), -1)
            nll[s:e] = -logp.gather(-1, ids[0, s + 1:e + 1, None]).squeeze(-1).double()
            held.append(cache.tokens_held()[0])
    cache.close()
    return [math.exp(float(nll[i:i + segment].mean())) for i in range(0, len(nll), segment)], held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="kvshrink model name or path, or 'tiny' (random weights)")
    ap.add_argument("--text", default="lcet10")
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--globals", type=int, default=10)
    ap.add_argument("--trained", type=int, default=0, help="trained length to assume (0: max_position_embeddings)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if args.model == "tiny":
        from kvshrink.testing import tiny_model

        model = tiny_model("llama", layers=2, max_positions=256)
        ids = torch.randint(3, 256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    else:
        from kvshrink.assets import read_texts
        from kvshrink.models import load_model

        model, tok = load_model(args.model)
        ids = tok(read_texts([args.text]), return_tensors="pt").input_ids[:, : args.tokens]
    trained = args.trained or model.config.max_position_embeddings
    window = trained - args.chunk  # so that local window + chunk stays within the trained length
    specs = ["none", f"lminfinite:globals={args.globals},local={window},cap={window}"]
    print(f"model={args.model} tokens={ids.shape[-1]} trained={trained} chunk={args.chunk}")
    rows = {}
    for spec in specs:
        t = time.time()
        rows[spec], held = segment_ppl(model, ids, spec, args.chunk, args.segment)
        print(f"{spec}: {time.time() - t:.0f}s, tokens held at the end: {held[-1]}", flush=True)
    print("segment start | " + " | ".join(specs))
    for i in range(len(rows[specs[0]])):
        print(f"{i * args.segment:>13} | " + " | ".join(f"{rows[s][i]:.2f}" for s in specs))


if __name__ == "__main__":
    main()
