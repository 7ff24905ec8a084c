"""Daedalus: crypto market-data capture and ETL."""

__version__ = "0.1.0"
