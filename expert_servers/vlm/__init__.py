"""placeholder package; the vlm adapters land here."""
