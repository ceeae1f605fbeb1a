"""`python -m training.decoders train [--modality image|audio|video|all] [--smoke]` and `python -m training.decoders eval`."""

import sys

from training.decoders.train import main

if __name__ == "__main__":
    sys.exit(main())
