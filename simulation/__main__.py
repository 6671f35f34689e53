"""``python -m simulation --config configs/default.yaml [--out DIR] [--rounds N] [--sites N] [--set k=v]``."""

import sys

from simulation.cli import main

sys.exit(main())
