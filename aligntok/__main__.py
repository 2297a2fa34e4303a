from aligntok.cli import main

raise SystemExit(main())
