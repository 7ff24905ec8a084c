"""What can go wrong with one segment, and therefore where it goes (see :mod:`daedalus.etl.job`).

In their own module so that every source's ETL parser (:mod:`daedalus.sources`) can raise them
without importing the job."""

from __future__ import annotations


class EtlIoError(Exception):
    """The machine, not the data, failed (disk full, permissions): the segment stays in
    ``processing/`` and is retried by the next run."""


class SegmentDataError(Exception):
    """The segment cannot become data at all (not one line of it can be used as it is):
    it goes to quarantine whole, with this reason."""
