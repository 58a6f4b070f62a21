"""Per-sequence state of the mixers that are not attention (Gated DeltaNet...), and those mixers."""
