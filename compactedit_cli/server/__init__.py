"""``compactedit serve``: one loaded :class:`~compactedit_cli.editor.Editor` behind an OpenAI-compatible HTTP API.

The model loads once; edits then cost only their own time. ``address`` says where the server listens (a Unix socket
of mode 0600 by default, TCP only when asked), ``jobs`` runs the edits one at a time on a worker thread, ``app`` is
the Starlette application (parsing, limits, OpenAI-shaped errors), ``run`` puts them together under uvicorn and
``client`` is the small standard-library client that ``serve status`` and ``serve stop`` use.
"""
