"""Models that ship with multiserve."""
