"""Data sets, label mappings, joint transforms and negative sources."""
