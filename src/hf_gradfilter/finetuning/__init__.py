"""Stage 5, the target: fine-tune a model on a selection with TRL + LoRA (`finetune`), and compare
two fine-tuned targets with a pairwise LLM judge (`judge`, `compare`)."""
