"""``kvshrink calibrate``: calibrate a method on text and write a calibration file (safetensors + JSON).

    kvshrink calibrate --model default --method rotatekv --text lcet10 --out smollm2-rotatekv.safetensors
    kvshrink generate "..." --method rotatekv:calib=smollm2-rotatekv.safetensors
"""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("calibrate", help="calibrate a method (e.g. rotatekv's channel order) on text; write a file")
    p.add_argument("--model", default="default", help="local HF directory, a .gguf file, or 'default' / 'qwen-coder'")
    p.add_argument("--method", default="rotatekv", help="method spec to calibrate for (default: rotatekv)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files or built-in text names (default: the default text; "
                        "prefer text other than what you evaluate on)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens to use at most (default 4096)")
    p.add_argument("--out", required=True, help="output file, ending in .safetensors (a .json beside it too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def run(args) -> int:
    import sys

    import torch

    from ..assets import DEFAULT_TEXTS, read_texts
    from ..calibration import make_metadata, save_calibration, text_sha256
    from ..cache import resolve_methods
    from ..errors import SpecError
    from ..model_info import model_info
    from ..models import load_model
    from ..registry import get_method_class, method_names

    def calibrator(cls):  # a method takes a calibration file if its module defines calibrate(model, method, ids)
        return getattr(sys.modules[cls.__module__], "calibrate", None) if hasattr(cls, "calib_params") else None

    methods = resolve_methods(args.method)
    method = next((m for m in methods if calibrator(type(m))), None)
    if method is None:
        takes = ", ".join(n for n in method_names() if calibrator(get_method_class(n)))
        raise SpecError(f"nothing to calibrate in {args.method!r}: methods that take a calibration file: {takes}")
    calibrate = calibrator(type(method))
    if method.calib:
        raise SpecError("drop calib= from --method when calibrating (the output file is --out)")
    if not str(args.out).endswith(".safetensors"):
        raise SpecError(f"--out must end in .safetensors, got {args.out}")
    if args.tokens < 16:
        raise SpecError(f"--tokens must be at least 16, got {args.tokens}")
    text = read_texts(args.text or list(DEFAULT_TEXTS))
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    info = model_info(model)
    method.validate(info)
    ids = tok(text, return_tensors="pt")["input_ids"][:, :args.tokens]
    with torch.no_grad():
        tensors = calibrate(model, method, ids)
    meta = make_metadata(method.name, method.calib_params(info), info.identity(), tensors, text_sha256(text),
                         ids.shape[1])
    path = save_calibration(args.out, tensors, meta)
    print(f"wrote {path} ({len(tensors)} tensors, {ids.shape[1]} tokens, params {meta['params']}) and {path}.json")
    print(f"use it with --method {method.name}:calib={path}")
    return 0
