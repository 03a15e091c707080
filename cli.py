"""compressor command line: python cli.py fit|validate --config configs/<x>.yaml (see --help)."""

import sys

from compressor.cli import main

if __name__ == "__main__":
    sys.exit(main())
