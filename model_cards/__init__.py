"""Jinja templates of the Hub cards written by `hf_gradfilter.hub` (shipped as `hf_gradfilter.model_cards`)."""
