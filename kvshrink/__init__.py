"""kvshrink: shrink the KV cache of Hugging Face decoder LLMs, with honest measurements."""
from .cache import KVShrinkCache, make_cache
from .errors import CalibrationMismatchError, KVShrinkError, SpecError, UnsupportedModelError
from .model_info import ModelInfo, model_info
from .registry import create, describe, get_method_class, method_names, parse_spec, register

__version__ = "0.1.0"

__all__ = ["KVShrinkCache", "make_cache", "KVShrinkError", "SpecError", "UnsupportedModelError",
           "CalibrationMismatchError", "ModelInfo", "model_info", "create", "describe", "get_method_class",
           "method_names", "parse_spec", "register", "__version__"]
