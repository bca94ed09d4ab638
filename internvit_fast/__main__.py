"""``python -m internvit_fast``: the command line (internvit_fast/cli)."""
import sys

from .cli import main

sys.exit(main())
