"""Data sets read from local disk (nothing is ever downloaded): images, English text, seeded splits."""
