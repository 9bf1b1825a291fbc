"""``python -m ernieq`` and ``torchrun --nproc-per-node N -m ernieq``: the command line (``ernieq.cli``)."""

from ernieq.cli import main

if __name__ == "__main__":
    main()
