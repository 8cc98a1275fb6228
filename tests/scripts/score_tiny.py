"""Score 37 demo rows with a tiny GPT-2 ensemble; run as a subprocess by the distributed and resume tests.

    python score_tiny.py --output_dir OUT [--batch 4] [--save_steps 3] [--sleep 0.2]
    torchrun --nproc_per_node 2 score_tiny.py --output_dir OUT --batch 2

Started again with the same command, it resumes from the last checkpoint in OUT.
"""

import argparse
import os
import time

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.data.formatting import ALPACA_PROMPT_WITH_INPUT
from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.demo.tiny import tiny_gpt2, train_tokenizer
from hf_gradfilter.proxy import merge as merge_module


class StepLog(TrainerCallback):
    """Counts the optimizer steps this process ran (in OUT/steps_run.txt), optionally slowly."""

    def __init__(self, seconds, path):
        self.seconds, self.path, self.steps = seconds, path, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        time.sleep(self.seconds)

    def on_train_end(self, args, state, control, **kwargs):
        with open(self.path, "w") as f:
            f.write(str(self.steps))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=37)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--record_mode", default="train")
    parser.add_argument("--sketch_dim", type=int, default=0)
    parser.add_argument("--sketch_storage", default="members")
    parser.add_argument("--gather_chunk", type=int, default=0, help="values per all-reduce when merging records")
    args = parser.parse_args()
    if args.gather_chunk:
        merge_module.GATHER_CHUNK_VALUES = args.gather_chunk

    demo = make_demo_dataset(num_rows=400, seed=1)
    texts = [ALPACA_PROMPT_WITH_INPUT] + [r["instruction"] + " " + r["input"] + " " + r["output"] for r in demo]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    rows = demo.select(range(args.rows)).select_columns(["instruction", "input", "output"])
    config = GradFilterConfig(
        output_dir=args.output_dir, num_members=2, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, num_train_epochs=2, learning_rate=5e-3, lora_r=4, lora_alpha=8,
        max_length=256, disable_tqdm=True, seed=3, use_cpu=True, record_mode=args.record_mode,
        sketch_dim=args.sketch_dim, sketch_storage=args.sketch_storage,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, logging_steps=1000,
    )
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config, train_dataset=rows,
                                processing_class=tokenizer,
                                callbacks=[StepLog(args.sleep, os.path.join(args.output_dir, "steps_run.txt"))])
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model()


if __name__ == "__main__":
    main()
