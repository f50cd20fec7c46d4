"""``python -m interpret COMMAND``: top-examples, interpret and score without the llama3-sae launcher."""

import sys

from .cli import main

sys.exit(main())
