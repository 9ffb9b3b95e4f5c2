"""``python -m data_pipeline.prepare``: the same command as ddpm-prepare."""

import sys

from data_pipeline.prepare.cli import main

sys.exit(main())
