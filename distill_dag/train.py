"""``python -m distill_dag.train ...`` is ``distill train ...`` (the seed's entry point, kept)."""

import sys

from distill_dag.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
