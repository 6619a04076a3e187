"""BonjourGrid: a peer-to-peer desktop grid over mDNS/DNS-SD."""

__version__ = "0.1.0"
