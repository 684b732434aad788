"""Scripts that measure; what several of them share is in common.py."""
