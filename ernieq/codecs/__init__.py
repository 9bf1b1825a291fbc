"""What the numbers are: every codec registers itself here on import."""

from ernieq.codecs.base import (
    CalibrationStats,
    Codec,
    CodecError,
    QuantizedTensor,
    codec_for,
    codec_names,
    decode,
    get_codec,
    register_codec,
    stack_experts,
)

__all__ = [
    "CalibrationStats",
    "Codec",
    "CodecError",
    "QuantizedTensor",
    "codec_for",
    "codec_names",
    "decode",
    "get_codec",
    "register_codec",
    "stack_experts",
]

from ernieq.codecs import wint8, wint4, fp8  # noqa: F401  (registers)
from ernieq.codecs import ccq2  # noqa: F401  (registers)
