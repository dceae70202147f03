"""`python -m mdpo` (and `torchrun -m mdpo`): the same as the `mdpo` command."""

import sys

from mdpo.lifeline import watch_launcher

watch_launcher()  # before the heavy imports below: a launcher killed during start-up takes this worker with it

from mdpo.cli import main  # noqa: E402 - after the watchdog on purpose

if __name__ == "__main__":
    sys.exit(main())
