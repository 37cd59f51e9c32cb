"""Feature stages: text, visual, acoustic.

Each module's `run(manifest, params, cache_root, out_path)` plans cache keys,
extracts what the per-clip cache lacks and writes features/<stage>.parquet via
the shared runner; `table.read_feature_table` loads a table back.
"""
