"""`python -m treeopt`: the same command as `treeopt`."""
from .cli import main

raise SystemExit(main())
