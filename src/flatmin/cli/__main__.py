"""``python -m flatmin.cli``: the ``flatmin`` command."""

from flatmin.cli import main

raise SystemExit(main())
