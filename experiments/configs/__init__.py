"""Training configs: `get_config(arg)` per file; shared pieces in `common`."""
