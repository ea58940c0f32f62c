"""`python -m fada_batch` is the same as the `fada-batch` console script."""

import sys

from fada_batch.cli import main

sys.exit(main())
