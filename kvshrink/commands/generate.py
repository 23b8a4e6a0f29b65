"""``kvshrink generate``: generate text with a compressed cache and report the bytes it holds."""
from __future__ import annotations

import time


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text with a compressed KV cache")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="default", help="local HF directory, a .gguf file, or 'default' / 'qwen-coder'")
    p.add_argument("--method", action="append", default=None,
                   help="method spec (repeat the flag to compare several side by side); default: none")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", choices=["auto", "on", "off"],
                   help="on CUDA, attend over the packed cache with kvshrink's Triton kernels (auto: when the device "
                        "is CUDA; on: insist; off: dequantize, then SDPA)")
    p.add_argument("--graph", action="store_true",
                   help="CUDA only: decode with one step captured in a CUDA graph and replayed (static cache; kivi, "
                        "rotatekv or none; no sliding-window models) instead of model.generate's eager steps; "
                        "kivi:bits=2 with group = head_dim (64 or 128; e.g. group=128,residual=128) on a 16-bit model "
                        "with at most 8 query heads per KV head takes the fastest kernel (codes in the tensor cores' "
                        "fragment order)")
    return p


def run(args) -> int:
    import torch

    from ..cache import make_cache, resolve_methods
    from ..eval.runner import _pick_device
    from ..hf_compat import cache_kw
    from ..kernels._triton import kernels_for
    from ..models import load_model

    specs = args.method or ["none"]
    for spec in specs:  # fail on a bad spec before spending time loading the model
        resolve_methods(spec)
    device = _pick_device(args.device)
    kernels = kernels_for(args.kernels, device)
    if args.graph:
        from ..kernels.graph_generate import graph_kind

        if torch.device(device).type != "cuda":
            raise SystemExit(f"kvshrink generate: --graph needs a CUDA device (got {device}); pass --device cuda, "
                             "or drop --graph")
        for spec in specs:
            graph_kind(spec)  # a spec graph mode does not serve fails here, before the model loads
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    text = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt").to(device)
    rows = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for spec in specs:
        t0 = time.perf_counter()
        if args.graph:
            out, held, fp16, tokens = _generate_graph(model, inputs, spec, args.max_new_tokens, pad)
            label = spec + " [CUDA graph]"
        else:
            cache = make_cache(model, spec, kernels=kernels)
            with torch.no_grad():
                out = model.generate(**inputs, **cache_kw(model, cache), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
            cache.compact()  # the bytes of what is stored (see KVShrinkCache.compact)
            held, fp16, tokens, label = cache.nbytes(), cache.fp16_nbytes(), cache.get_seq_length(), cache.spec
        dt = time.perf_counter() - t0
        completion = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append((label, held, fp16))
        print(f"=== {label}")
        print(text + completion)
        print(f"--- KV bytes held: {held:,} ({held / fp16:.3f}x of a 16-bit cache's {fp16:,}) "
              f"for {tokens} tokens" + (" (the static capacity)" if args.graph else "")
              + f"; {dt:.1f} s" + ("; GPU kernels" if kernels or args.graph else ""))
    if len(rows) > 1:
        print("\nmethod                                   KV bytes   x fp16")
        for spec, held, fp16 in rows:
            print(f"{spec[:40]:40s} {held:10,d}   {held / fp16:.3f}")
    return 0


def _generate_graph(model, inputs, spec: str, max_new_tokens: int, pad):
    """``generate_graph`` for the CLI (eos from the model's generation config, as ``model.generate`` takes it): the
    sequences, bytes held (static buffers: capacity for prompt + ``max_new_tokens``, also when every row stopped
    early), a 16-bit cache's bytes for as many tokens, and that capacity."""
    from ..kernels.graph_generate import generate_graph
    from ..model_info import model_info

    out, cache = generate_graph(model, inputs["input_ids"], inputs.get("attention_mask"), spec=spec,
                                max_new_tokens=max_new_tokens, pad_token_id=pad)
    info = model_info(model)
    tokens = inputs["input_ids"].shape[1] + max_new_tokens  # the capacity the static layers hold
    fp16 = 2 * info.num_layers * out.shape[0] * info.num_kv_heads * info.head_dim * 2 * tokens
    return out, sum(layer.nbytes() for layer in cache.layers), fp16, tokens
