from qnoded.cli import main

raise SystemExit(main())
