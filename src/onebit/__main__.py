"""``python -m onebit`` (and ``torchrun -m onebit``) runs the command line."""
import os
import sys

from .cli import main

code = main()
world_size = os.environ.get("WORLD_SIZE", "")
if world_size.isdigit() and int(world_size) > 1:
    # A torchrun worker ends without interpreter finalization: a gloo worker thread may still be
    # destroying the last barrier's work object, whose Python references then take the GIL while
    # the interpreter tears down, and the process aborts ("terminate called without an active
    # exception", seen in 1 of ~15 runs on a loaded machine; pytorch/pytorch#179291). Its files
    # are all written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
