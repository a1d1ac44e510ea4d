"""`python -m neoxlite`: the same as the `neoxlite` command."""

from neoxlite.cli import main

raise SystemExit(main())
