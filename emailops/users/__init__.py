"""The people who use the operator console: accounts, passwords, API tokens and roles (issue 23)."""
