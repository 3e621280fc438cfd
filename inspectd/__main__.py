from inspectd.cli import main

raise SystemExit(main())
