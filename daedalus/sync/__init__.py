"""``daedalus sync``: closed raw segments and processed files to any S3-compatible store."""
