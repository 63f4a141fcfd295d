from nanogpt.cli import main

raise SystemExit(main())
