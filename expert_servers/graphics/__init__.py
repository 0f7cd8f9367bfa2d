"""placeholder package; the graphics adapters land here."""
