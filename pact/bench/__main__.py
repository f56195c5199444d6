"""`python -m pact.bench <name> ...` (the same as `pact bench <name> ...`)."""

from pact.bench import main

raise SystemExit(main())
