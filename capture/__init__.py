"""Activation capture and preprocessing: text sources, length-bucketed batches, the capture loop (one
process or torchrun), the sharded activation store, and per-dimension statistics + global shuffle.

Entry points: ``capture.capture.run_capture`` / ``llama3-sae capture`` and
``capture.preprocess.run_preprocess`` / ``llama3-sae preprocess``; the store is read with
``capture.store.ActivationStore``. Kept import-light: the capture's writer process imports
``capture.store`` and should not pay for the rest.
"""
