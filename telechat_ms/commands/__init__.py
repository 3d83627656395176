"""The sub-commands of `telechat-ms`, one module per area; each has `register(subparsers)` and thin handlers that
parse arguments and call the library. telechat_ms/cli.py lists them in one table and handles their errors."""
