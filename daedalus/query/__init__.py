"""``daedalus query``: DuckDB over the processed dataset, one view per dataset."""
