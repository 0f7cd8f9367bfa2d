"""placeholder package; the flow adapters land here."""
