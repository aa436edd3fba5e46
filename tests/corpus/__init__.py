"""Message corpora for tests: generated hostile messages (``hostile``)."""
