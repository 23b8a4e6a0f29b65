"""Errors kvshrink raises on bad input. Each message names the problem and the fix."""


class KVShrinkError(ValueError):
    """Base class: bad input to kvshrink (a spec, a parameter, a model, a file)."""


class SpecError(KVShrinkError):
    """A method spec string or parameter is invalid."""


class UnsupportedModelError(KVShrinkError):
    """The model has no KV cache kvshrink can compress (e.g. a state-space model)."""


class CalibrationMismatchError(KVShrinkError):
    """A calibration file was made for another model, shape or method."""
