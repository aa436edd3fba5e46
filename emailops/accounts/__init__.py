"""Mailboxes ("accounts") of a deployment: their configuration as one value (``config``), the
keys an operator writes (``fields``), the ``accounts`` table (``store``), a sign-in check
(``probe``), and how each fares (``state``, ``gate``)."""
