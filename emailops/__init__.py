"""EmailOps: the domain library (IMAP sync, MIME parsing, index, rules, replies, outbox, CLI).

This package never reads the environment and never imports ``prod``: it takes plain values.
"""

__version__ = "0.1.0"
