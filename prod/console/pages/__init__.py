"""The console's pages, one module each, with their routes (``ROUTES``)."""
