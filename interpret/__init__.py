"""What each latent means: top-activating examples, labels from Claude (or a local heuristic), and
detection scores of the labels. File formats: see ``interpret.records``.

    from interpret import heuristic_labels, iter_examples, parse_label
    heuristic_labels(sae_dir)          # no-API labels into SAE_DIR/latents.jsonl (the demo uses this)

The torch side (``interpret.examples``) is imported only where it is used.
"""

from .labels import HEURISTIC_SOURCE, heuristic_label, heuristic_labels, merge_labels
from .parsing import ParseError, parse_detection, parse_label
from .records import LatentExamples, iter_examples, parse_latent_spec, read_examples_meta, read_latents, write_latents

__all__ = ["HEURISTIC_SOURCE", "LatentExamples", "ParseError", "heuristic_label", "heuristic_labels",
           "iter_examples", "merge_labels", "parse_detection", "parse_label", "parse_latent_spec",
           "read_examples_meta", "read_latents", "write_latents"]
