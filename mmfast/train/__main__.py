"""python -m mmfast.train: the same as `mmfast-train`."""

import sys

from .cli import train_main

sys.exit(train_main())
