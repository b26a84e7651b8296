"""`python -m multiserve` runs the same CLI as the `multiserve` console script."""

from multiserve.cli import main

raise SystemExit(main())
