"""`python -m mdpo` (and `torchrun -m mdpo`): the same as the `mdpo` command."""

import sys

from mdpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
