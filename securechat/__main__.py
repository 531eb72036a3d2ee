import sys; from securechat.cli import main; sys.exit(main())  # noqa: E401,E702
