"""The ``llama3-sae`` command: one console script, one subcommand per stage.

Each subcommand lives in its stage's package and is imported only when called, so ``llama3-sae --help``
stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from llama3_sae.errors import USER_ERRORS, describe

# name -> (module, function, one-line description). Each function takes (argv, prog) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("apps.demo", "main_demo",
             "the whole pipeline on the built-in SmolLM2-135M-Instruct: topic features, steering, numbers"),
    "test-model": ("apps.tiny_model", "main_tiny_model",
                   "write (or find) the tiny random Llama 3 test checkpoint (for tests, not the demo); print its path"),
    "complete": ("apps.complete", "main_complete", "stream text completions for one or more prompts"),
    "chat": ("apps.chat", "main_chat", "interactive chat in the terminal, with steering and the active latents"),
    "ui": ("apps.web", "main_ui", "the web app (Gradio): steer with sliders, latent pages, attribute outputs to latents"),
    "latent": ("apps.latent", "main_latent", "a latent's page in the terminal: examples, density, output tokens"),
    "export-dashboard": ("apps.dashboard", "main_export_dashboard",
                         "feature dashboards: Neuronpedia batch files and a static site that opens from disk"),
    "steer-eval": ("apps.steer_eval", "main_steer_eval",
                   "score steering a latent on concept and fluency at several strengths, against prompting"),
    "geometry": ("apps.geometry", "main_geometry",
                 "match the latents of two SAEs by decoder cosine: matched, split and novel latents, a 2-D map"),
    "contrast": ("apps.contrast", "main_contrast",
                 "the latents that most separate two sets of texts (Welch's t), or a text from the corpus"),
    "capture": ("capture.cli", "main_capture",
                "store activations at hook sites for a text or chat dataset (torchrun -m capture for several GPUs)"),
    "preprocess": ("capture.cli", "main_preprocess", "statistics and a global shuffle of an activation store"),
    "train": ("training.cli", "main_train", "train an SAE on an activation store (torchrun -m training for DDP)"),
    "eval": ("training.cli", "main_eval", "evaluate SAEs on held-out text: L0, EV, delta LM loss, fidelity"),
    "inspect-sae": ("training.cli", "main_inspect",
                    "what the loader understood about an SAE file (layout, site, normalisation, scales); L0 / EV"),
    "top-examples": ("interpret.cli", "main_top_examples", "top-activating documents of every latent, written beside the SAE"),
    "interpret": ("interpret.cli", "main_interpret", "label latents with Claude (Message Batches) or --heuristic"),
    "score": ("interpret.cli", "main_score", "detection-score the labels; summary table and histogram"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama3-sae COMMAND [options]   (llama3-sae COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"llama3-sae: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(module), func)
    try:
        return int(fn(rest, prog=f"llama3-sae {name}") or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        # User-caused problems (bad paths, bad checkpoints, bad options) are reported, not traced back.
        print(f"llama3-sae {name}: error: {describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
