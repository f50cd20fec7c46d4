"""``python -m training ...`` / ``torchrun --nproc-per-node N -m training ...``: the same code as
``llama3-sae train``. ``python -m training eval ...`` runs ``llama3-sae eval``."""

import sys

from .cli import main_eval, main_train

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["eval"]:
        sys.exit(main_eval(args[1:], prog="python -m training eval"))
    sys.exit(main_train(args, prog="python -m training"))
