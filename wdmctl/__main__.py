"""`python -m wdmctl` (and so `accelerate launch -m wdmctl ...`)."""

from wdmctl.cli import main

if __name__ == "__main__":
    main()
