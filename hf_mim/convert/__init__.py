"""Official checkpoint -> hf_mim converters. Command line: `python -m hf_mim.convert <method> ...`
(`--list` for the official releases)."""

from .amt import convert_amt_checkpoint
from .common import ConversionReport, Settings
from .dbot import convert_dbot_checkpoint
from .extrema import convert_extrema_checkpoint
from .files import CheckpointFormatError, OfficialFile, load_official_state_dict, read_official_file
from .maskdistill import convert_maskdistill_checkpoint

__all__ = [
    "CheckpointFormatError",
    "ConversionReport",
    "OfficialFile",
    "Settings",
    "convert_amt_checkpoint",
    "convert_dbot_checkpoint",
    "convert_extrema_checkpoint",
    "convert_maskdistill_checkpoint",
    "load_official_state_dict",
    "read_official_file",
]
