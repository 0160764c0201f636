"""``python -m server`` runs the same CLI as the ``loraplex`` script."""

from server.cli import main

raise SystemExit(main())
