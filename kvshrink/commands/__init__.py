"""Sub-commands of the kvshrink CLI, one module each (see kvshrink.cli)."""
