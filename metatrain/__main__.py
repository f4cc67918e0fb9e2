from metatrain.cli import main

raise SystemExit(main())
