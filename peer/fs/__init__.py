"""The file system view: POSIX meaning on top of the merged state.

Its modules log under peer.NAME (`logging.getLogger("peer.sync")`), the
names they had before the sub-packages, so log lines stay as they were.
"""
