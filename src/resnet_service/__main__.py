"""``python -m resnet_service`` runs the CLI."""

from resnet_service.cli import main

raise SystemExit(main())
