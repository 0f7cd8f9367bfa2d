"""placeholder package; the classifier adapters land here."""
