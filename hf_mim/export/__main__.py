"""`python -m hf_mim.export ...`: see hf_mim/export/__init__.py."""

import sys

from . import main

sys.exit(main())
