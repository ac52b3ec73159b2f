"""Data in (readers, preprocessing) and results out (export)."""
