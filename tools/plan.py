"""`python tools/plan.py --model llama2-70b --nodes 4 --gpu a800-80g [...]`: the same as `mdpo plan ...` (per-GPU
memory by part and step time of one layout, or the feasible layouts ranked)."""

import sys

from mdpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
