"""The web console for interface analysts: a message browser, the outbox, the review queue, the roster, senders.

Served by Twisted from ``make_service`` when ``[console] enabled``; server-rendered
HTML with a little JavaScript of its own (``static/``), no build step and no CDN.
Modules, one concern each:

- :mod:`~gateway.app.console.service`: the listener (HTTPS with the [tls] server
  certificate), the worker threads, the search index's background work;
- :mod:`~gateway.app.console.app`: login, sessions, CSRF, roles, routing, auditing;
- :mod:`~gateway.app.console.auth`: argon2 password hashes, tokens, the login throttle;
- :mod:`~gateway.app.console.browser`, :mod:`~gateway.app.console.queues`,
  :mod:`~gateway.app.console.roster`, :mod:`~gateway.app.console.senders`,
  :mod:`~gateway.app.console.admin`: the pages;
- :mod:`~gateway.app.console.html` and :mod:`~gateway.app.console.exchange`: HTML
  and the request and response values the pages use.

It lives in ``gateway.app`` because it calls the application layer's library
(``gateway.app.operations``, as the CLI does) and ``make_service`` starts it:
as a package of its own beside ``gateway.app`` the two would import each other.
"""

from gateway.app.console.app import ConsoleApp
from gateway.app.console.service import ConsoleService, web_console

__all__ = ["ConsoleApp", "ConsoleService", "web_console"]
