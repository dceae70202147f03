"""`python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp N]`: the same as
`mdpo convert hf-to-megatron ...` (Llama 2 / Tulu 2, Qwen 1.0, Baichuan 2 -> reshardable Megatron checkpoint)."""

import sys

from mdpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
