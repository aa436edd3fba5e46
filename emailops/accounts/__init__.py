"""Mail accounts: what the daemon knows of each mailbox it serves."""
