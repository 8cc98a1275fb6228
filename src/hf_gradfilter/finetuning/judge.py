"""The judge verb (``hf-gradfilter judge``): answer the prompt sets with two fine-tuned targets and
compare the answers pairwise with an LLM judge (`judge`), resumably."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import pairwise as judge


@dataclass
class JudgeArguments:
    """Pairwise LLM-as-a-judge between two fine-tuned targets (resumable: rerun to continue)."""

    target_a: str = field(metadata={
        "help": "Target A: a model or adapter folder (e.g. fine-tuned on the G-SNR split)."})
    target_b: str = field(metadata={"help": "Target B: the model to compare against (e.g. random split)."})
    prompts: list[str] = field(metadata={"help": "Prompt sets: .jsonl/.json files (Vicuna, Koala, WizardLM, "
                                                 "Self-Instruct, LIMA schemas) or Hub dataset ids."})
    output_dir: str = field(default="judge_output", metadata={"help": "Answers, judgements and the report go here."})
    name_a: str = field(default="A", metadata={"help": "Display name of target A."})
    name_b: str = field(default="B", metadata={"help": "Display name of target B."})
    judge_model: str | None = field(default=None, metadata={"help": "A local transformers chat model as judge."})
    judge_url: str | None = field(default=None, metadata={"help": "An OpenAI-compatible endpoint (vLLM, TGI, ...)."})
    judge_served_name: str | None = field(default=None, metadata={"help": "Model name at the endpoint."})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key for the endpoint (never printed)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Answer length."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})


def compare(args: JudgeArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (args.judge_model is None) == (args.judge_url is None):
        raise ValueError("Pass exactly one judge: --judge_model (local) or --judge_url (OpenAI-compatible endpoint).")
    prompts = [p for source in args.prompts for p in judge.load_prompts(source)]
    os.makedirs(args.output_dir, exist_ok=True)
    answers = []
    for target, name in ((args.target_a, args.name_a), (args.target_b, args.name_b)):
        model = AutoModelForCausalLM.from_pretrained(target)  # an adapter folder loads through PEFT
        tokenizer = AutoTokenizer.from_pretrained(target)
        answers.append(judge.generate_answers(model, tokenizer, prompts, os.path.join(args.output_dir,
                       f"answers_{name}.jsonl"), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
        del model
    if args.judge_url:
        judge_fn = judge.EndpointJudge(args.judge_url, model=args.judge_served_name, api_key=args.judge_api_key)
    else:
        judge_fn = judge.LocalJudge(AutoModelForCausalLM.from_pretrained(args.judge_model),
                                    AutoTokenizer.from_pretrained(args.judge_model))
    pairs = judge.judge_pairs(judge_fn, prompts, answers[0], answers[1],
                              os.path.join(args.output_dir, "judgements.jsonl"))
    print(judge.report(pairs, args.output_dir, args.name_a, args.name_b))
    print(f"Report: {args.output_dir}/pairwise.md, {args.output_dir}/pairwise.png")
