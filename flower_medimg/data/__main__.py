"""Run :func:`flower_medimg.data.cli.main`: ``python -m flower_medimg.data --help``."""

from flower_medimg.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
