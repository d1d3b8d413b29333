"""Decode / prefill benchmark: a thin wrapper over ``rs_compile.bench`` (same flags as
``rs-compile bench``; see docs/benchmarks.md)."""

import sys

from rs_compile.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
