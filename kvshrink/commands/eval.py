"""``kvshrink eval``: compare KV-cache methods on one model and text, honestly measured.

    kvshrink eval                                   # the demo preset (a few minutes on 2 CPU cores)
    kvshrink eval --model default --text lcet10 --methods none int8 kivi:bits=2,group=32 kivi:bits=4 \\
                  --tasks ppl,kl,passkey,memory,speed --max-tokens 4096 --out results/
    kvshrink eval --methods-file ablations.txt --tasks ppl,kl      # a sweep: one spec per line

Explicit flags override the preset's settings; without --methods and --methods-file the ``demo``
preset is used.
"""
from __future__ import annotations

from pathlib import Path

_PRESET_KEYS = ("methods", "tasks", "max_tokens", "window", "mode", "chunk_size", "prompt_tokens",
                "passkey_lengths", "passkey_depths", "passkey_trials", "speed_tokens", "decode_tokens")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(sub):
    from ..eval.runner import PRESETS, TASKS
    from ..eval.ppl import MODES

    p = sub.add_parser("eval", help="evaluate KV-cache methods: perplexity, KL, passkey, bytes, speed",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings (default: 'demo' when no --methods/--methods-file is given); "
                        "explicit flags override them")
    p.add_argument("--model", default="default", help="'default', 'qwen-coder', a local HF directory or a .gguf file")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="named texts (lcet10, alice, pydocs, tempfile, argparse) or local files; default: lcet10")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="method specs, one per argument (specs contain commas), e.g. none int8 kivi:bits=2,group=32; "
                        "'none' (the reference) is always added first")
    p.add_argument("--methods-file", type=Path, default=None, metavar="FILE",
                   help="file with one method spec per line (# comments and blank lines ignored); adds to --methods")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from: {','.join(TASKS)} (default: ppl,kl,passkey,memory,speed)")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="write results.json, results.csv, pareto.png and heatmaps here (default: ./results)")
    p.add_argument("--no-out", dest="out", action="store_const", const=None, help="print the table only, write no files")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", choices=["auto", "on", "off"],
                   help="GPU kernels: auto (default) serves the caches with kvshrink's Triton kernels on CUDA (decode "
                        "and chunked prefill over the packed cache), on insists (error off CUDA), off keeps the torch "
                        "path (dequantize, then SDPA)"),
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; the demo preset: 1). On a CPU shared with other jobs, 1 can be "
                        "many times faster than 2: busy-waiting threads stall when a core is taken")
    g = p.add_argument_group("perplexity / KL / top-1")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens of the text to score, in windows (default 2048)")
    g.add_argument("--window", type=int, default=None, help="tokens per window; each starts with a fresh cache (default 1024)")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="decode (default: each scored token decoded one by one from the compressed past, after a "
                        "prompt prefilled at once), chunked (cheaper: each chunk attends to the compressed past + "
                        "itself uncompressed, which flatters methods without a residual), simulated (papers' "
                        "one-pass fake-quant mode)")
    g.add_argument("--chunk-size", type=int, default=None, help="tokens per forward pass in chunked mode (default 32)")
    g.add_argument("--prompt-tokens", type=int, default=None,
                   help="first tokens of each window prefilled at once and not scored (default 768)")
    g = p.add_argument_group("passkey / needle retrieval")
    g.add_argument("--passkey-lengths", type=_int_list, default=None, metavar="N,N,...",
                   help="context lengths in tokens (default 512,1024,2048)")
    g.add_argument("--passkey-depths", type=_float_list, default=None, metavar="D,D,...",
                   help="needle depths in [0, 1] (default 0,0.5,1)")
    g.add_argument("--passkey-trials", type=int, default=None, help="samples per cell (default 1)")
    g.add_argument("--haystack", nargs="+", default=None, metavar="FILE", help="prose for the haystack (default lcet10)")
    g.add_argument("--prefill-chunk", type=int, default=256, help="tokens per forward pass when prefilling (default 256)")
    g = p.add_argument_group("memory / speed")
    g.add_argument("--speed-tokens", type=int, default=None, help="context tokens prefilled before decoding (default 1024)")
    g.add_argument("--decode-tokens", type=int, default=None, help="greedy decode steps timed (default 32; demo 16)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not fail when a compressing method holds as many bytes as 'none'")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def read_methods_file(path: Path) -> list[str]:
    from ..errors import KVShrinkError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise KVShrinkError(f"cannot read --methods-file {path}: {exc}") from None
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def build_config(args):
    """EvalConfig from parsed flags: built-in defaults < preset < explicit flags."""
    from ..eval.runner import EvalConfig, preset

    methods = list(args.methods or [])
    if args.methods_file is not None:
        methods += read_methods_file(args.methods_file)
    name = args.preset or (None if methods else "demo")
    values = preset(name) if name else {}
    if methods:
        values["methods"] = methods
    flags = dict(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
                 max_tokens=args.max_tokens, window=args.window, mode=args.mode, chunk_size=args.chunk_size,
                 prompt_tokens=args.prompt_tokens, passkey_lengths=args.passkey_lengths,
                 passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials,
                 speed_tokens=args.speed_tokens, decode_tokens=args.decode_tokens, texts=args.text,
                 haystack=args.haystack, threads=args.threads)
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = EvalConfig(**values, model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, kernels=args.kernels,
                     prefill_chunk=args.prefill_chunk, verify=args.verify, progress=args.progress)
    return cfg, name


def run(args) -> int:
    from ..eval.runner import run as run_eval

    cfg, name = build_config(args)
    cfg.check()
    if name:
        print(f"(preset {name!r}: methods {' '.join(cfg.ordered_methods())}; tasks {','.join(cfg.tasks)}"
              + (f"; {cfg.threads} CPU thread(s)" if cfg.threads else "") + ")")
    run_eval(cfg, out=args.out)
    return 0
