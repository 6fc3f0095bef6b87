"""`python -m arpg_hf ...` is the `arpg-hf` command."""

import sys

from .cli import main

sys.exit(main())
