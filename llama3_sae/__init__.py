"""The base layer under every stage of llama3-sae: nothing here imports a stage."""
