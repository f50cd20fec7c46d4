"""``python -m capture ...`` / ``torchrun --nproc-per-node N -m capture ...``: the same code as
``llama3-sae capture``. ``python -m capture preprocess ...`` runs ``llama3-sae preprocess``."""

import sys

from .cli import main_capture, main_preprocess

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["preprocess"]:
        sys.exit(main_preprocess(args[1:], prog="python -m capture preprocess"))
    sys.exit(main_capture(args, prog="python -m capture"))
