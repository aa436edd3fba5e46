"""OAuth2 sign-in for IMAP and SMTP: provider presets, the token store shared by every worker,
token refresh serialised through the database, the device-code login, and the SASL strings.

The domain library takes an ``OAuth2Config`` (built by ``prod.runtime_settings``) and an engine;
it never reads the environment.
"""
