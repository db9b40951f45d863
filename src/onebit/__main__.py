"""``python -m onebit`` (and ``torchrun -m onebit``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
