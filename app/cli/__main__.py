"""`python -m app.cli ...`, the same as `mtp ...`."""

import sys

from app.cli.main import main

sys.exit(main())
