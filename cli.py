from treeopt.cli import main  # the product card's entry point; `treeopt` is installed
raise SystemExit(main())
