"""``python -m mpcompile`` = the ``mpcompile`` command."""

import sys

from mpcompile.cli import main

sys.exit(main())
