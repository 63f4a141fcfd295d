"""python -m nanogpt.serve: the same as `nanogpt serve`."""

import sys

from nanogpt.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
