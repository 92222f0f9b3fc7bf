"""``python -m bus.cli``: the same as the ``syncbus`` console script."""

from bus.cli import main

if __name__ == "__main__":
    main()
