"""`python -m pact ...` is the same as the `pact` console script."""

import sys

from pact.cli import main

sys.exit(main())
