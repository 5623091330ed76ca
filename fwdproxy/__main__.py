from fwdproxy.cli.main import main

raise SystemExit(main())
