"""``python -m trainer`` / ``torchrun --nproc-per-node N -m trainer``, options as ``moderation train``."""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
