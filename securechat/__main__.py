from securechat.cli import main

raise SystemExit(main())
