"""``daedalus plot``: a picture of one product's book, trades and bars."""
