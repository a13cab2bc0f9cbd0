"""``python -m slimformer``."""

from slimformer.cli import main

main()
