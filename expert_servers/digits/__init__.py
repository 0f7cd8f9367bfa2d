"""placeholder package; the digits adapters land here."""
