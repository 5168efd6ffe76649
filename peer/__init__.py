"""The dfs-peer node: CLI, volume, store, crypto, sync; the composition root."""
