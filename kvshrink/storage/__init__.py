"""How bits sit in memory: packing and uniform quantization. Knows nothing of methods."""
from .packing import SUPPORTED_BITS, check_bits, pack, packed_size, unpack
from .quantize import (SCALE_DTYPES, QuantizedTensor, check_finite, check_group, dequantize_codes, fake_quantize,
                       quantize, regroup_channels)

__all__ = ["SUPPORTED_BITS", "check_bits", "pack", "packed_size", "unpack", "SCALE_DTYPES", "QuantizedTensor",
           "check_finite", "check_group", "dequantize_codes", "fake_quantize", "quantize", "regroup_channels"]
