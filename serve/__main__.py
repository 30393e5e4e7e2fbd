"""`python -m mixserve` = the `mixserve` command."""

from __future__ import annotations

from mixserve.cli import main

raise SystemExit(main())
