"""``python -m internvit_fast.mmseg train|test`` (internvit_fast/mmseg/cli.py)."""
import logging
import os
import sys

from .cli import main

code = main()
if os.environ.get("WORLD_SIZE", "1") != "1":
    # Under torchrun: everything is done and written, and the process group is gone, yet
    # the interpreter's teardown now and then destroys a C++ thread of torch.distributed
    # that is still joinable ("terminate called without an active exception", SIGABRT),
    # which fails the whole run. Flush and leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code or 0)
sys.exit(code)
