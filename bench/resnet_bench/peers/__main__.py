"""``python -m resnet_bench.peers`` (``make bench-peers``)."""

from resnet_bench.peers.run import main

raise SystemExit(main())
