"""`python -m ddp_launch ...` is `ddp-launch ...`."""

from ddp_launch.cli import main

if __name__ == "__main__":
    main()
