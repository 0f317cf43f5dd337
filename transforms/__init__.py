"""Pure Polars functions of frames: parsing, validation, deduplication, extraction, windows, aggregation.

Nothing here reads or writes storage or knows about Prefect; `flows/` owns all I/O.
"""
