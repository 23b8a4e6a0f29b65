"""What kvshrink needs to know about a decoder model's attention, read from its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelInfo:
    """Attention geometry of a decoder model (one entry per decoder layer in ``layer_kinds``)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_kinds: tuple[str, ...]  # "full" (compressed), "sliding" (kept as transformers' window layer), "other"
    sliding_window: int | None = None
    name: str = ""
    config: Any = field(default=None, compare=False, repr=False)

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def identity(self) -> dict:
        """The facts a calibration file must agree with to be usable on this model."""
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "name": self.name,
        }


def model_info(model_or_config: Any) -> ModelInfo:
    """Read the attention geometry of a causal LM (or its config); refuse models without a KV cache."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", type(text).__name__)
    heads = getattr(text, "num_attention_heads", None)
    if not heads or getattr(text, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model type {model_type!r} has no attention KV cache kvshrink can compress "
            "(state-space / recurrent models such as Mamba keep a fixed-size state instead); "
            "use a decoder-only transformer (Llama, Qwen2/3, Mistral, Gemma2/3, Phi-3, ...)"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    try:
        layers = DynamicCache(config=text).layers
    except Exception as exc:  # a config transformers itself cannot build a cache for
        raise UnsupportedModelError(f"transformers cannot build a KV cache for model type {model_type!r}: {exc}") from exc
    kinds = []
    for layer in layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            kinds.append("sliding")
        elif type(layer) is DynamicLayer:
            kinds.append("full")
        else:
            kinds.append("other")
    if "full" not in kinds and "sliding" not in kinds:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no attention layers with a growing KV cache "
            f"(layer kinds: {sorted(set(type(l).__name__ for l in layers))}); nothing to compress"
        )
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))
    return ModelInfo(
        model_type=model_type,
        num_layers=len(layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layer_kinds=tuple(kinds),
        sliding_window=getattr(text, "sliding_window", None),
        name=name,
        config=text,
    )
