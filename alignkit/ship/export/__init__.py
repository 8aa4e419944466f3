"""`alignkit export`: a LoRA adapter merged into its base, written as a Hugging Face folder, checked against the
unmerged model and optionally quantized. `settings` reads what to export (flags, a mapping, LLaMA-Factory's
merge YAML), `merge` does it, `card` writes the model card and the summary."""
