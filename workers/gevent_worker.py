"""Where ``postback-relay worker --pool gevent`` runs: gevent patches the standard library here,
before socket, ssl, threading, redis or requests are imported, then the usual CLI takes over.

The ``worker`` command re-executes itself through this module (same PID, same arguments) when
the gevent pool is chosen, because by the time click has parsed the options the CLI has long
imported everything gevent needs to patch first.
"""

from gevent import monkey

monkey.patch_all()

from workers.cli.main import main  # noqa: E402 - must come after the patching

if __name__ == "__main__":
    main()
