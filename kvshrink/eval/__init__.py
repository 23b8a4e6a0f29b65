"""The evaluation harness behind ``kvshrink eval``: perplexity with the compressed cache in the loop,
fidelity to the uncompressed model (KL, top-1), passkey / needle retrieval, measured KV bytes, peak
memory and speed, reported as a Markdown table, results.json / results.csv and plots.

>>> from kvshrink.eval import EvalConfig, run
>>> rows = run(EvalConfig(methods=["none", "kivi:bits=2"], tasks=["ppl", "kl"]), out=Path("results"))
"""
from .runner import PRESETS, TASKS, EvalConfig, evaluate, preset, run, write_outputs

__all__ = ["EvalConfig", "PRESETS", "TASKS", "evaluate", "preset", "run", "write_outputs"]
