"""Greedy generation with the decode step captured in a CUDA graph: the fast GPU path in one call.

``model.generate`` runs every decode step eagerly, and on the GPU that is host-bound: transformers' Python plus
each cache layer's bookkeeping and kernel launches take longer than the GPU work (docs/KERNELS.md, session 7:
16-bit eager steps of the Llama-3-8B shape already take ~2x their GPU time at batch 8). :func:`generate_graph`
does what the static-cache recipe in the README does by hand: one prefill into static layers
(:func:`~.graph.make_static_cache`), then :class:`~.graph.GraphDecoder` replays one captured step per token.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..hf_compat import cache_kw

#: method names generate_graph serves, and the static layers each becomes
GRAPH_KINDS = {"kivi": "kivi", "rotatekv": "rotatekv", "none": "dense"}


def graph_kind(spec: str) -> tuple[str, dict]:
    """``(kind, layer parameters)`` of :func:`~.graph.make_static_cache` for a method spec; a clear error for a
    spec graph mode does not serve (a policy, another quantizer)."""
    from ..cache import resolve_methods

    methods = resolve_methods(spec)
    if len(methods) != 1 or methods[0].name not in GRAPH_KINDS:
        names = " + ".join(m.name for m in methods)
        raise ValueError(f"graph mode serves one of {sorted(GRAPH_KINDS)} (a single quantizer, no policy), got "
                         f"{names!r}; use model.generate with make_kernel_cache for other specs")
    m = methods[0]
    kind = GRAPH_KINDS[m.name]
    if kind == "kivi":
        from ..storage import SCALE_DTYPES

        if m.residual < m.group or m.residual % m.group:
            raise ValueError(f"graph mode needs kivi's residual ({m.residual}) a positive multiple of its group "
                             f"({m.group}): e.g. kivi:group={m.group},residual={max(1, m.residual // m.group) * m.group}")

        return kind, {"bits": m.bits, "group": m.group, "residual": m.residual,
                      "scale_dtype": SCALE_DTYPES[m.scale_dtype]}
    return kind, ({"spec": spec} if kind == "rotatekv" else {})


@torch.no_grad()
def generate_graph(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   spec: str = "kivi:bits=2,group=128,residual=128", max_new_tokens: int = 32,
                   eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
                   check_every: int = 16) -> tuple[torch.Tensor, "object"]:
    """Greedy decoding of ``input_ids (B, T)`` (left-padded rows: ``attention_mask``) for ``max_new_tokens`` with a
    ``spec`` cache (``kivi``, ``rotatekv`` or ``none``, the 16-bit baseline) in CUDA-graph mode.

    Returns ``(sequences (B, T + n), cache)``: the prompt and the ``n <= max_new_tokens`` new tokens (as
    ``model.generate`` with ``do_sample=False``: a row that produced ``eos_token_id`` is filled with
    ``pad_token_id`` after it; generation stops once every row has, checked every ``check_every`` steps, the
    only host syncs of the loop), and the static cache (``sum(l.nbytes() for l in cache.layers)`` bytes).
    As in ``generate``, ``eos_token_id`` and ``pad_token_id`` default to ``model.generation_config``'s (eos: an
    int or a list; pad: else the first eos); pass ``eos_token_id=()`` to generate all ``max_new_tokens``.
    The model is switched to kvshrink's attention for the call and restored after it.
    """
    from ..model_info import model_info
    from .attention import disable
    from .graph import GraphDecoder, make_static_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1 (steps between the checks for eos), got {check_every}")
    if input_ids.device.type != "cuda":
        raise ValueError("generate_graph captures CUDA graphs: the model and input_ids must be on a CUDA device "
                         "(on the CPU use model.generate with make_cache)")
    kinds = set(model_info(model).layer_kinds)
    if kinds != {"full"}:
        raise ValueError(f"graph mode needs every layer to attend the whole sequence; this model has {sorted(kinds)} "
                         "layers (sliding windows): use model.generate with make_kernel_cache")
    kind, params = graph_kind(spec)
    B, T = input_ids.shape
    eos_list, pad_token_id = _stop_tokens(model, eos_token_id, pad_token_id)
    eos = torch.tensor(eos_list, dtype=torch.long, device=input_ids.device)
    was_enabled = getattr(model, "_kvshrink_prev_attn", None) is not None
    cache = make_static_cache(model, T + max_new_tokens, kind=kind, **params)
    try:
        mask = attention_mask.to(input_ids.device) if attention_mask is not None else None
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else None
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, **cache_kw(model, cache),
                    use_cache=True, logits_to_keep=1)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        done = torch.isin(tokens[0], eos)
        if max_new_tokens > 1:
            dec = GraphDecoder(model, cache, tokens[0][:, 0], position=T, warmup=min(2, max_new_tokens - 1),
                               attention_mask=mask)
            for t in dec.warmup_tokens:
                tokens.append(t)
                done |= torch.isin(t, eos)
            while len(tokens) < max_new_tokens:
                if eos.numel() and len(tokens) % check_every == 0 and bool(done.all()):
                    break
                tokens.append(dec.step().clone())
                done |= torch.isin(tokens[-1], eos)
        for layer in cache.layers:
            if hasattr(layer, "settle"):
                layer.settle()  # the host's view of a RotateKV layer (and a warning for dropped sinks)
    finally:
        if not was_enabled:
            disable(model)
    new = torch.cat(tokens, 1)
    if eos.numel():  # what generate does: a finished row is padded after its first eos
        hit = torch.isin(new, eos).long()
        new = new.masked_fill(hit.cumsum(1) - hit > 0, pad_token_id)
    return torch.cat([input_ids, new], 1), cache


def _stop_tokens(model: torch.nn.Module, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """``(eos ids in order, pad id)``: the arguments, else ``model.generation_config``'s, as ``generate`` takes
    them; pad falls back to the first eos id (``generate`` does the same, with a warning)."""
    gen = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    ids = [int(i) for i in dict.fromkeys(ids)]  # in order, once each
    if pad_token_id is None and ids:
        pad_token_id = ids[0]
    return ids, pad_token_id


__all__ = ["generate_graph", "graph_kind", "GRAPH_KINDS"]
