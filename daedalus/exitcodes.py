"""Exit codes every ``daedalus`` command keeps; the supervisor acts on them.

- 0: done (a long-running command stopped as asked).
- 1: a runtime failure that a restart may cure (disk error, lock held by another
  process, a bug). ``daedalus run`` restarts the child with backoff.
- 2: the operator must act: invalid configuration or flags, credentials that cannot sign,
  a data directory that cannot be written, an ETL checkpoint that needs
  ``--rebuild-state``. Restarting cannot cure it, so ``daedalus run`` marks the child
  ``fatal`` and leaves it stopped (the others keep running).
"""

OK = 0
FAILED = 1
NEEDS_OPERATOR = 2
