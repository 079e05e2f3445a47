"""``python -m flatmin.cli``: the ``flatmin`` command."""

from flatmin.cli import main

if __name__ == "__main__":  # importing this module (e.g. to collect doctests) runs nothing
    raise SystemExit(main())
