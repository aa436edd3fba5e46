"""Throwaway local mail servers for the test suite, the benchmarks and the zero-setup demo.

- ``prod.localmail.dovecot.LocalDovecot``: a private Dovecot (IMAP, IMAPS/STARTTLS, LMTP).
- ``prod.localmail.smtp_relay.LocalSmtpRelay``: an authenticated SMTP server that delivers into it
  (needs ``aiosmtpd``, a test requirement).
- ``prod.localmail.certs.make_test_certificates``: a test CA and a loopback server certificate.

Nothing here is imported by the daemon itself; the modules are imported by their full names so
that using one does not pull in the others' dependencies.
"""
