"""Stage 2, the proxy: M LoRA members on one frozen causal LM trained in one run (`trainer`), each
member's data order (`sampler`), the per-example gradient-norm kernel (`norms`), and what it all
records (`record`); the snapshot pass, the distributed merge, the float32 re-record and the
checkpoint state each have a module of their own."""
