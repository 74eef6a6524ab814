"""commcheck: an nccl-tests-style all_reduce check run on Ray (or local processes).

Importing this package imports neither torch nor Ray; the launchers import
them when they run.
"""

from batchrun.commcheck.report import Report, Row

__all__ = ["Report", "Row"]
