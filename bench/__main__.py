"""``python -m bench``: run the benchmark suite (see bench/README.md)."""

from bench._harness import main

raise SystemExit(main())
