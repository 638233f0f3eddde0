"""What every test layer needs, and nothing that needs a server.

The layers (see DEVELOPERS.md):

* ``tests/unit``: no RabbitMQ, no Redis. Pure functions, golden messages, fakes (a fake broker
  on a local socket), subprocesses that need no server. ``pytest tests/unit`` passes on a
  laptop with neither; ``scripts/test`` runs it with both pointed at closed ports.
* ``tests/integration``, ``tests/interop``, ``tests/process``: the real servers. Their
  ``conftest.py`` imports the fixtures of ``services.py``, whose ``_services_up`` fails every
  test there when a server is missing (never a skip).

This file exists for its place: being the root conftest, it puts ``tests/`` on ``sys.path`` so
that test files import ``helpers``, ``services`` and ``tcp_proxy`` by name. It must import
neither ``redis`` nor anything that reaches a server.
"""
