from neoxlite.app.cli import main

raise SystemExit(main())
