from scratchlm.cli import main

raise SystemExit(main())
