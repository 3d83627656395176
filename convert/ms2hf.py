#!/usr/bin/env python
"""Convert a MindSpore TeleChat2 checkpoint (ours, or the public port's .ckpt/safetensors) to an HF directory.

    python convert/ms2hf.py MS_DIR OUT_DIR [--dtype float32|float16|bfloat16] [--max-shard-size 5GB]

A thin wrapper over `telechat-ms convert ms2hf` (telechat_ms.weights.convert_checkpoint).
"""
import sys

from telechat_ms.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "ms2hf", *sys.argv[1:]]))
