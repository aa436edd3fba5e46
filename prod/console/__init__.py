"""The operator console: EmailOps in the browser (Starlette, Jinja2 templates, vendored htmx).

With ``WEB_PORT`` set the supervisor serves it as one more supervised process
(``prod.console.server``); ``create_app`` builds the ASGI application for it and for the tests.

Adding a page:

1. Write its handler in a module of ``prod.console.pages``: a plain function taking a ``Call``
   (the request, who asks, the form, the console's context) and returning a response; it calls
   the ``emailops`` function that does the work (the command line calls the same one) and
   ``call.render("page.html", ...)`` for the page or ``call.json({...})`` for the API.
2. Add its entries to that module's ``ROUTES``: one ``ConsoleRoute`` for the page and one for
   ``/api/v1/...``, each naming the ``Action`` of ``emailops.users.permissions`` it needs (``nav``
   puts the page in the navigation, shown only to roles that may open it). The permission is
   checked in one place (``prod.console.app``), with the CSRF token and the Origin of every
   unsafe request; the tests enumerate the route table, so a new route is in the permission
   matrix, the header checks and the secret crawl without further ado.
3. Its template extends ``base.html`` and fills ``{% block main %}``; every form carries
   ``{{ csrf_field() }}``. Every JSON object carries ``id`` and ``url`` (its page's address:
   ``call.url("/page#id")``).
"""
