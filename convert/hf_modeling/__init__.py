"""The PyTorch modeling code `convert.to_hf` copies into exported Hugging Face directories (loaded there with
trust_remote_code; kept importable here so packaging ships it)."""
