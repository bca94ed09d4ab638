"""``internvit-fast`` (and ``python -m internvit_fast``): one entry, three subcommands.

    internvit-fast [compare] [--config ...] [--checkpoint ...] [--image ...] ...
    internvit-fast segment IMAGES_OR_DIRS... --out DIR [--checkpoint CKPT] ...
    internvit-fast precision [--checkpoint CKPT] [--images DIR] ...

``compare`` (the default when no subcommand is named): the reference and the fast backbone
on the same weights and input, the parity check and their times. ``segment``: masks for
images. ``precision``: what precision="fp8" changes in the features. ``--help`` after any of
them says more. Images are read by one hardened reader (images.py).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from . import compare, precision, segment

COMMANDS = {"compare": compare, "segment": segment, "precision": precision}


def main(argv: Optional[List[str]] = None) -> int:
    command_line = argv is None  # only then may the process start again in Triton's interpreter
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if argv[:1] == ["--version"]:
        from .. import __version__
        print(f"internvit-fast {__version__}")
        return 0
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].main(argv[1:], command_line=command_line)
    return compare.main(argv, command_line=command_line)
