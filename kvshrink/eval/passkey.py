"""Retrieval under a compressed cache: passkey retrieval and needle-in-a-haystack.

A haystack of real prose (the default text, never a hub data set) is cut to a target context length;
a needle sentence carrying a random key is inserted programmatically at a sentence boundary near the
requested depth; a question follows. The whole context is prefilled into the compressed cache in
chunks, then the answer is generated greedily from the compressed cache. A sample counts as correct
when the first run of digits in the answer is the key.

* ``passkey`` (Mohtashami & Jaggi 2023, "Landmark Attention", the passkey task): a 5-digit pass key.
* ``needle`` (Kamradt's needle-in-a-haystack, in RULER's single-key form, Hsieh et al. 2024): a 7-digit
  "special magic number" tied to a random word, asked for by that word.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..hf_compat import cache_kw
from ..cache import make_cache
from ..errors import KVShrinkError

KINDS = ("passkey", "needle")

_WORDS = ("harbor", "lantern", "meadow", "copper", "falcon", "orchid", "granite", "willow", "ember", "quartz",
          "saddle", "tundra", "violet", "beacon", "cobalt", "juniper", "marble", "pepper", "thistle", "walnut")


@dataclass(frozen=True)
class Template:
    prefix: str
    needle: str  # formatted with key=, word=
    question: str  # formatted with word=
    digits: int


TEMPLATES: dict[str, Template] = {
    "passkey": Template(
        prefix="There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n",
        needle=" The pass key is {key}. Remember it. {key} is the pass key.",
        question="\n\nWhat is the pass key? The pass key is",
        digits=5,
    ),
    "needle": Template(
        prefix="A special magic number is hidden in the following text. Memorize it. "
               "I will quiz you about it.\n\n",
        needle=" One of the special magic numbers for {word} is: {key}.",
        question="\n\nWhat is the special magic number for {word} mentioned in the text? "
                 "The special magic number for {word} mentioned in the text is:",
        digits=7,
    ),
}


@dataclass
class NeedleSample:
    """One retrieval prompt. ``input_ids[needle_start:needle_start + needle_len]`` is the needle."""

    kind: str
    input_ids: list[int]
    key: str
    length: int
    depth: float  # requested, 0 = start of the haystack, 1 = its end
    actual_depth: float  # where the needle really sits: haystack tokens before it / haystack tokens
    needle_start: int
    needle_len: int
    hay_start: int  # token span of the haystack (needle included)
    hay_end: int


class Haystack:
    """Tokenized prose with the token indices where a sentence ends (where a needle may go)."""

    def __init__(self, tokenizer: Any, text: str, max_tokens: int = 200_000) -> None:
        self.tokenizer = tokenizer
        ids = tokenizer(text[: max_tokens * 8], add_special_tokens=False)["input_ids"]
        self.ids: list[int] = list(ids[:max_tokens])
        pieces = {i: tokenizer.decode([i]) for i in set(self.ids)}
        # boundary b: a sentence ends just before token b (token b-1 ends with ".", "!" or "?")
        ends = {i for i, p in pieces.items() if p.strip().endswith((".", "!", "?"))}
        self.boundaries = [b for b in range(1, len(self.ids)) if self.ids[b - 1] in ends]
        if len(self.boundaries) < 4:
            raise KVShrinkError("the haystack text has too few sentences; pass prose (e.g. --haystack lcet10)")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_sample(tokenizer: Any, hay: Haystack, kind: str, length: int, depth: float,
                rng: random.Random) -> NeedleSample:
    """Build a ``length``-token retrieval prompt with the needle at about ``depth`` of the haystack."""
    if kind not in TEMPLATES:
        raise KVShrinkError(f"unknown retrieval task {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise KVShrinkError(f"needle depth must be within [0, 1], got {depth}")
    t = TEMPLATES[kind]
    key = str(rng.randrange(10 ** (t.digits - 1), 10 ** t.digits))
    word = rng.choice(_WORDS)
    prefix = list(tokenizer(t.prefix)["input_ids"])  # the tokenizer's own special tokens (BOS) go first
    needle = _encode(tokenizer, t.needle.format(key=key, word=word))
    question = _encode(tokenizer, t.question.format(word=word))
    k = length - len(prefix) - len(needle) - len(question)
    if k < 16:
        raise KVShrinkError(f"context length {length} is too short for the {kind} prompt; use at least "
                            f"{len(prefix) + len(needle) + len(question) + 16} tokens")
    # the haystack excerpt starts at a sentence start, at a random place (fixed by the seed)
    starts = [b for b in hay.boundaries if b + k <= len(hay.ids)]
    if not starts:
        raise KVShrinkError(f"the haystack text is shorter than {k} tokens; pass a longer --haystack text")
    start = rng.choice(starts[: max(1, len(starts) // 2)])
    excerpt = hay.ids[start:start + k]
    # sentence ends inside the excerpt (relative), plus both ends: the needle goes at the nearest one
    cuts = [0] + [b - start for b in hay.boundaries if start < b < start + k] + [k]
    cut = min(cuts, key=lambda c: (abs(c - depth * k), c))
    ids = prefix + excerpt[:cut] + needle + excerpt[cut:] + question
    return NeedleSample(kind=kind, input_ids=ids, key=key, length=len(ids), depth=depth, actual_depth=cut / k,
                        needle_start=len(prefix) + cut, needle_len=len(needle), hay_start=len(prefix),
                        hay_end=len(prefix) + k + len(needle))


_NUMBER_DONE = re.compile(r"\d\D")


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int, start: int = 0) -> torch.Tensor:
    """Feed ``ids (1, n)`` into ``cache`` in chunks; return the last position's logits ``(V,)``."""
    last = None
    for s in range(0, ids.shape[1], chunk):
        x = ids[:, s:s + chunk]
        pos = torch.arange(start + s, start + s + x.shape[1], device=ids.device).unsqueeze(0)
        out = model(input_ids=x, **cache_kw(model, cache), position_ids=pos, use_cache=True, logits_to_keep=1)
        last = out.logits[0, -1]
    return last


def greedy_answer(model: Any, tokenizer: Any, spec: str, input_ids: list[int], *, prefill_chunk: int,
                  max_new_tokens: int, kernels: bool = False) -> str:
    """Prefill ``input_ids`` into a fresh cache of ``spec`` (chunked), then greedy-decode from it."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    cache = make_cache(model, spec, kernels=kernels)
    try:
        with torch.no_grad():
            logits = prefill(model, cache, ids, prefill_chunk)
            out: list[int] = []
            pos = ids.shape[1]
            eos = tokenizer.eos_token_id
            for _ in range(max_new_tokens):
                nxt = int(logits.argmax())
                if eos is not None and nxt == eos:
                    break
                out.append(nxt)
                if _NUMBER_DONE.search(tokenizer.decode(out, skip_special_tokens=True)):
                    break  # a whole number has been written: the answer is decided, stop early
                logits = model(input_ids=torch.tensor([[nxt]], device=device), **cache_kw(model, cache),
                               position_ids=torch.tensor([[pos]], device=device), use_cache=True).logits[0, -1]
                pos += 1
            if cache.get_seq_length() != pos:
                raise KVShrinkError(f"{spec}: the cache saw {cache.get_seq_length()} tokens, {pos} were fed: "
                                    "the model did not use the compressed cache")
    finally:
        cache.close()
    return tokenizer.decode(out, skip_special_tokens=True)


def build_grid(tokenizer: Any, hay: Haystack, kind: str, lengths: list[int], depths: list[float], trials: int,
               seed: int) -> list[NeedleSample]:
    """The same samples for every method: keys and excerpts depend only on (seed, kind, cell, trial)."""
    samples = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}/{kind}/{length}/{depth}/{trial}")
                samples.append(make_sample(tokenizer, hay, kind, length, depth, rng))
    return samples


def score(samples: list[NeedleSample], answers: list[str]) -> dict[str, Any]:
    """Accuracy overall and per cell: ``{"acc": a, "grid": {"length": {"depth": acc}}}``."""
    cells: dict[str, dict[str, list[bool]]] = {}
    hits = []
    for s, a in zip(samples, answers):
        ok = first_number(a) == s.key
        hits.append(ok)
        cells.setdefault(str(s.length), {}).setdefault(f"{s.depth:g}", []).append(ok)
    grid = {L: {d: sum(v) / len(v) for d, v in row.items()} for L, row in cells.items()}
    return {"acc": sum(hits) / len(hits) if hits else None, "grid": grid}
