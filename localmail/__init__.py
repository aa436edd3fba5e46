"""Throwaway local mail servers for the test suite, the benchmarks and the zero-setup demo.

- ``localmail.dovecot.LocalDovecot``: a private Dovecot (IMAP, IMAPS/STARTTLS, LMTP).
- ``localmail.cyrus.LocalCyrus``: a private Cyrus IMAP (IMAP, LMTP, idled), run from Debian's
  packages that ``python -m localmail.cyrus_packages`` unpacks. Both are
  ``localmail.imap_server.LocalImapServer``: tests written against it run on either.
- ``localmail.smtp_relay.LocalSmtpRelay``: an authenticated SMTP server that delivers into it
  (needs ``aiosmtpd``, a test requirement).
- ``localmail.certs.make_test_certificates``: a test CA and a loopback server certificate.
- ``localmail.oauth2_server.LocalOAuth2Server``: an OAuth2 authorization server (tests).
- ``python -m localmail.demo``: ``bin/run``'s zero-setup demo, the daemon against these servers.

Nothing here is imported by the daemon itself, and none of it is in the wheel or the daemon's
image (tests/test_packaging.py); the modules are imported by their full names so that using one
does not pull in the others' dependencies.
"""
