"""Parallel corpora: readers, normalisation and filters, language mixing, the bundled sample."""
