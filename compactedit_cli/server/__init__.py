"""``compactedit serve``: one loaded :class:`~compactedit_cli.editor.Editor` behind an OpenAI-compatible HTTP API.

The model loads once; edits then cost only their own time. ``address`` says where the server listens (a Unix socket
of mode 0600 by default, TCP only when asked), ``jobs`` runs the edits one at a time on a worker thread, ``app`` is
the Starlette application (parsing, limits, OpenAI-shaped errors), ``run`` puts them together under uvicorn and
``detach`` starts it in the background. ``client`` is the small standard-library client that ``serve status`` and
``serve stop`` use, and ``remote`` the Editor that ``edit`` and ``batch`` use through a server (``wire`` is what
they send each other). The client side imports no torch, Starlette or uvicorn.
"""
