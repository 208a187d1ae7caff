from growlm.cli import main

raise SystemExit(main())
