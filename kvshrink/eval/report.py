"""Results as a Markdown table (stdout), ``results.json`` (one object per method) and ``results.csv``."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

#: Fields every results.json object carries (null where a task was not run): a public contract.
REQUIRED_FIELDS = ("method", "ppl", "delta_ppl", "kl", "top1", "passkey_acc", "bytes_per_token",
                   "fp16_bytes_per_token", "decode_tok_s_ratio")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(_clean(rows), indent=1) + "\n", encoding="utf-8")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Flat columns only (nested grids and lists stay in the JSON)."""
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list, tuple)):
                cols.append(k)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in cols})


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, fmt)


_COLUMNS = [
    # header, key, format
    ("method", "method", "s"),
    ("PPL", "ppl", ".3f"),
    ("ΔPPL", "delta_ppl", "+.3f"),
    ("KL (nats)", "kl", ".4f"),
    ("top-1", "top1", ".3f"),
    ("passkey", "passkey_acc", ".2f"),
    ("needle", "needle_acc", ".2f"),
    ("KV B/token", "bytes_per_token", ",.0f"),
    ("x fp16", "bytes_vs_fp16", ".3f"),
    ("peak mem MB", "peak_mem_mb", ".1f"),
    ("prefill tok/s", "prefill_tok_s", ".0f"),
    ("decode tok/s", "decode_tok_s", ".1f"),
    ("decode x none", "decode_tok_s_ratio", ".2f"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per method; columns of tasks that were not run for any method are left out."""
    cols = [c for c in _COLUMNS if c[1] == "method" or any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
             "|" + "|".join("---" if k == "method" else "---:" for _, k, _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_f(r.get(k), fmt) if k != "method" else f"`{r[k]}`" for _, k, fmt in cols) + " |")
    return "\n".join(lines)
