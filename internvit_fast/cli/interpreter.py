"""Command lines on a CPU run the kernels in Triton's interpreter: Triton reads
TRITON_INTERPRET once, when it is imported, so the process starts again with it set."""
from __future__ import annotations

import os
import sys


def restart_in_interpreter() -> None:
    """Start this command line again (``python -m internvit_fast`` with the same arguments)
    with TRITON_INTERPRET=1, unless it is set already. Only ever called for a command line
    (the dispatcher's ``command_line``): a caller that passes its arguments keeps its process
    (its fast model runs the reference ops, with fast_path's warning)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.execve(sys.executable, [sys.executable, "-m", "internvit_fast", *sys.argv[1:]],
                  dict(os.environ, TRITON_INTERPRET="1"))
