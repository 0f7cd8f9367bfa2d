"""placeholder package; the physics adapters land here."""
