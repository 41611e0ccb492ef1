"""`python -m mmtag ...` (and `torchrun -m mmtag ...`) run the CLI."""
from .cli import main

raise SystemExit(main())
