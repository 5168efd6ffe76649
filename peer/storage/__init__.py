"""What a node keeps: the log and its chain, the store, blocks, checkpoints,
history and collection.

Its modules log under peer.NAME (`logging.getLogger("peer.sync")`), the
names they had before the sub-packages, so log lines stay as they were.
"""
