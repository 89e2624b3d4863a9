"""`python -m sparsekern ...`: the same as the `sparsekern` console script."""
import sys

from .cli import main

sys.exit(main())
