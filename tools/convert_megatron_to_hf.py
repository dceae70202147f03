"""`python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR`: the same as `mdpo convert megatron-to-hf ...`
(a converted or training checkpoint -> HF folder of the model's family)."""

import sys

from mdpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
