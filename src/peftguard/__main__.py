"""``python -m peftguard``: the same command line as the ``peftguard`` script."""
from peftguard.cli import main

if __name__ == "__main__":
    main()
