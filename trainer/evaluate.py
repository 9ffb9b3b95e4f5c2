"""``python -m trainer.evaluate``: sample from a checkpoint and score it (see trainer.evaluation.command)."""

import sys

from trainer.evaluation.command import main

if __name__ == "__main__":
    sys.exit(main())
