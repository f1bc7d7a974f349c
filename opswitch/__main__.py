"""``python -m opswitch`` is the ``opswitch`` command."""

from opswitch.cli.main import main

raise SystemExit(main())
