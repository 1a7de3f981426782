from pytorch_mqa.cli import main

raise SystemExit(main())
