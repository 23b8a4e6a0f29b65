"""The two kinds of method and what each must provide.

* A :class:`Quantizer` decides how the tokens that stay are stored: it builds one
  :class:`~kvshrink.layer.CompressedLayer` per full-attention layer.
* A :class:`Policy` decides which tokens stay (eviction, merging, channel pruning): it wraps the
  quantizer's layer. ``snapkv:budget=0.25+kivi:bits=2`` is one policy wrapping one quantizer.

Methods are small dataclasses whose fields are their parameters (with the paper's defaults); field
``metadata={"help": ...}`` documents a parameter for ``kvshrink info``. ``__post_init__`` validates what
can be checked without a model, :meth:`Method.validate` what needs the model's geometry.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SpecError

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import KVShrinkCache
    from ..layer import CompressedLayer
    from ..model_info import ModelInfo


class Method:
    """Base of every registered method (use a subclass: :class:`Quantizer` or :class:`Policy`)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def validate(self, info: "ModelInfo") -> None:
        """Check parameters against the model (e.g. group size vs head_dim). Raise SpecError."""

    def attach(self, model: Any, cache: "KVShrinkCache") -> list:
        """Install what the method needs on the model (e.g. hooks); return removable handles."""
        return []

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def spec(self) -> str:
        """The canonical spec string that recreates this method."""
        items = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return f"{self.name}:{items}" if items else self.name

    def __str__(self) -> str:
        return self.spec()


class Quantizer(Method):
    kind: ClassVar[str] = "quantizer"

    def make_layer(self, layer_idx: int, info: "ModelInfo") -> "CompressedLayer":
        raise NotImplementedError


class Policy(Method):
    kind: ClassVar[str] = "policy"

    def wrap(self, inner: "CompressedLayer", layer_idx: int, info: "ModelInfo") -> "CompressedLayer":
        raise NotImplementedError


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def require(cond: bool, message: str) -> None:
    """Raise SpecError(message) unless ``cond``: keeps parameter checks to one line each."""
    if not cond:
        raise SpecError(message)


def check_choice(method: str, param: str, value: Any, choices: tuple) -> None:
    require(value in choices, f"{method}: {param}={value!r} is not supported; choose one of {', '.join(map(str, choices))}")
