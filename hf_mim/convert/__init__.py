"""Official checkpoint -> hf_mim converters. Command line: `python -m hf_mim.convert <method> ...`."""

from .amt import convert_amt_checkpoint
from .common import CheckpointFormatError, ConversionReport, load_official_state_dict
from .dbot import convert_dbot_checkpoint
from .extrema import convert_extrema_checkpoint
from .maskdistill import convert_maskdistill_checkpoint

__all__ = [
    "CheckpointFormatError",
    "ConversionReport",
    "convert_amt_checkpoint",
    "convert_dbot_checkpoint",
    "convert_extrema_checkpoint",
    "convert_maskdistill_checkpoint",
    "load_official_state_dict",
]
