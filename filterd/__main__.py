from filterd.cli.main import main

raise SystemExit(main())
