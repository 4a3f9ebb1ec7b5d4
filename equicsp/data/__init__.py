"""Crystals in: CSV / CIF parsing, splits, device batches, the cache, the benchmark download."""
