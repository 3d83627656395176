#!/usr/bin/env python
"""Convert a released HF TeleChat2 checkpoint to MindSpore (the public port's names), streaming tensor by tensor.

    python convert/hf2ms.py HF_DIR OUT_DIR [--dtype float32|float16|bfloat16] [--max-shard-size 5GB]

A thin wrapper over `telechat-ms convert hf2ms` (telechat_ms.weights.convert_checkpoint).
"""
import sys

from telechat_ms.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf2ms", *sys.argv[1:]]))
