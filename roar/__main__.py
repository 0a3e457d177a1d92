from roar.cli import main

raise SystemExit(main())
