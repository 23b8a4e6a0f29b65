"""A ``kv-compression`` text-generation pipeline: compress a long context once, answer questions against it.

>>> import kvshrink.pipeline  # registers the task with transformers
>>> from transformers import pipeline
>>> pipe = pipeline("kv-compression", model=model, tokenizer=tokenizer)
>>> pipe(context, question="Who wrote it?", spec="snapkv:budget=0.25+kivi:bits=2")["answer"]
>>> pipe(context, questions=["Who?", "When?"], spec="snapkv:budget=512")["answers"]

The context is prefilled once with the cache's policies on (question-agnostic compression, the fair
setting: the question is not inside the compressed context). Each question, and its answer, is then
appended to a copy of that compressed cache with compression off, so question tokens are never evicted
and every question sees the same compressed context. The result also reports the cache's bytes and tokens
held after the context, so that the compression is visible (never silently not applied).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .hf_compat import cache_kw
from .cache import KVShrinkCache, make_cache
from .policy import compression


def _copy_layers(cache: KVShrinkCache) -> list:
    return _copy_layers_from(cache.layers, cache)


class KVCompressionPipeline(Pipeline):
    """Answer one or more questions against a context compressed once with a kvshrink spec."""

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None,
                             spec: str = "none", max_new_tokens: int = 50, answer_prefix: str = "",
                             simulated: bool = False, **kwargs: Any):
        if question is not None and questions is not None:
            raise ValueError("give either question= or questions=, not both")
        qs = [question] if question is not None else list(questions or [""])
        preprocess = {"questions": qs, "answer_prefix": answer_prefix}
        forward = {"spec": spec, "max_new_tokens": max_new_tokens, "simulated": simulated,
                   "single": questions is None}
        return preprocess, forward, {}

    def preprocess(self, context: str, questions: list[str], answer_prefix: str = ""):
        ctx = self.tokenizer(context, return_tensors="pt", add_special_tokens=True).input_ids
        qids = [self.tokenizer(q + answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids
                for q in questions]
        return {"context_ids": ctx, "question_ids": qids}

    def _forward(self, inputs: dict, spec: str = "none", max_new_tokens: int = 50, simulated: bool = False,
                 single: bool = True):
        model = self.model
        ctx = inputs["context_ids"].to(model.device)
        cache = make_cache(model, spec, simulated=simulated)
        with torch.no_grad():
            model(ctx, **cache_kw(model, cache), use_cache=True)
        stats = {"context_tokens": int(ctx.shape[-1]), "cache_bytes": cache.nbytes(),
                 "fp16_bytes": cache.fp16_nbytes(), "tokens_held": cache.tokens_held()}
        saved = _copy_layers(cache)
        answers = []
        eos = self.tokenizer.eos_token_id
        for q in inputs["question_ids"]:
            cache.layers[:] = _copy_layers_from(saved, cache)
            full = torch.cat([ctx, q.to(model.device)], dim=-1)
            with compression(cache, False), torch.no_grad():
                out = model.generate(full, attention_mask=torch.ones_like(full), **cache_kw(model, cache),
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos if eos is not None else 0)
            answers.append(out[0, full.shape[-1]:])
        cache.close()
        return {"answers": answers, "stats": stats, "single": single}

    def postprocess(self, outputs: dict):
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in outputs["answers"]]
        result = dict(outputs["stats"])
        if outputs["single"]:
            result["answer"] = texts[0]
        else:
            result["answers"] = texts
        return result


def _copy_layers_from(saved: list, cache: KVShrinkCache) -> list:
    # One deepcopy of the whole list, so that links between layers (MiniCache pairs, CAKE's coordinator)
    # point into the copy; ModelInfo (and the config it holds) is shared, not copied.
    memo = {id(cache.info): cache.info}
    return copy.deepcopy(list(saved), memo)


PIPELINE_REGISTRY.register_pipeline("kv-compression", pipeline_class=KVCompressionPipeline,
                                    pt_model=AutoModelForCausalLM)
