"""`python -m yirage_dynamo ...`: the `yirage` command, for environments whose scripts
directory is not on PATH (a venv used without activating it)."""

import sys

from yirage_dynamo.cli import main

sys.exit(main())
