from stylelora.cli import main

raise SystemExit(main())
