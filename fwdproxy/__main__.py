from fwdproxy.cli import main

raise SystemExit(main())
