"""Operating Daedalus: the records children publish, health, metrics and the status page."""
