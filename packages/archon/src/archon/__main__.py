from archon.cli import main

raise SystemExit(main())
