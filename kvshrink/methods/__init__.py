"""One file per method; each registers itself by name (see kvshrink.registry)."""
