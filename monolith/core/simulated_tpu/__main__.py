"""`python -m monolith.core.simulated_tpu ...`: dry-run a TPU program to the device boundary."""

import sys

from monolith.core.simulated_tpu import dry_run

if __name__ == "__main__":
    sys.exit(dry_run.main(sys.argv[1:]))
