"""What a node says to its peers: the wire format, requests and their
authentication, the server and sync, and pairing by a one-time code.

Its modules log under peer.NAME (`logging.getLogger("peer.sync")`), the
names they had before the sub-packages, so log lines stay as they were.
"""
