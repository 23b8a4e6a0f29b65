"""Tiny random-weight models of each supported family, built from configs in code (no hub, no files).

Used by the test suite and handy for users checking a method on their architecture's shapes.
"""
from __future__ import annotations

import torch

from .hf_compat import cache_kw

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def tiny_config(family: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
                vocab: int = 256, sliding_window: int = 16, max_positions: int = 1024):
    """A small config of ``family`` (GQA by default; ``kv_heads=1`` gives MQA)."""
    import transformers as tf

    hidden = heads * head_dim
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(head_dim=head_dim, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, **common)
    if family == "mistral":
        return tf.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return tf.Gemma2Config(head_dim=head_dim, sliding_window=sliding_window, layer_types=types, **common)
    if family == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return tf.Gemma3TextConfig(head_dim=head_dim, sliding_window=sliding_window, layer_types=types, **common)
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **kw):
    """A random-weight causal LM of ``family`` in eval mode (fixed seed)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **kw)
    if family == "gemma2" and attn == "sdpa":
        attn = "eager"  # transformers runs Gemma2 (attention soft-capping) with eager attention only
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


@torch.no_grad()
def greedy_steps(model, cache, ids: torch.Tensor, steps: int, attention_mask: torch.Tensor | None = None,
                 padding: str = "every") -> torch.Tensor:
    """Prefill ``ids (B, n0)`` into ``cache``, then ``steps`` greedy one-token steps with explicit positions (each
    row's own, from ``attention_mask``, when the prompt is left-padded); returns the steps' logits
    ``(steps, B, vocab)``. With a mask, ``padding`` says how the steps see it: ``"every"`` step gets the growing
    mask, ``"once"``: the cache's layers get the prompt's mask once (``set_padding``: how graph mode takes it),
    ``"none"``: not at all (the padded slots are attended: to show that the mask matters)."""
    if padding not in ("every", "once", "none"):
        raise ValueError(f"padding must be 'every', 'once' or 'none', got {padding!r}")
    B, n0 = ids.shape
    am, dev = attention_mask, ids.device
    extra = {} if am is None else {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}
    tok = model(input_ids=ids, **cache_kw(model, cache), use_cache=True, **extra).logits[:, -1:].argmax(-1)
    if am is not None and padding == "once":
        for layer in cache.layers:
            layer.set_padding(am)
    start = torch.full((B, 1), n0, device=dev) if am is None else am.sum(1, keepdim=True)
    outs = []
    for i in range(steps):
        extra = {}
        if am is not None and padding == "every":
            extra["attention_mask"] = torch.cat([am, torch.ones_like(am[:, :i + 1])], 1)
        logits = model(input_ids=tok, position_ids=start + i, cache_position=torch.tensor([n0 + i], device=dev),
                       **cache_kw(model, cache), use_cache=True, **extra).logits[:, -1]
        outs.append(logits)
        tok = logits[:, None].argmax(-1)
    return torch.stack(outs)


def tiny_tokenizer():
    """A character-level fast tokenizer (ids < 128) that pairs with :func:`tiny_model` for CLI tests."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny(directory, family: str = "llama", **kw) -> str:
    """Save a tiny random model and its tokenizer as a local HF directory (for CLI tests); return the path."""
    model = tiny_model(family, **kw)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)
