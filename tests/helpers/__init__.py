"""Helper modules shared by the tests (importable as ``helpers.*``: ``pythonpath = tests``)."""
