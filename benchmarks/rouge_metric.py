"""ROUGE-L as an `evaluate` metric module that loads offline: ``evaluate.load("benchmarks/rouge_metric.py")``.

The Hub's ``evaluate-metric/rouge`` cannot be fetched without network; this module computes the
same ROUGE-L F-measure with Google's `rouge_score` package (``pip install rouge_score``), the
library that metric wraps: the mean over pairs of ``rougeL`` F1 (longest common subsequence),
tokenized by `rouge_score`'s default tokenizer (lower-cased words), Porter stemming on.
"""

import datasets
import evaluate
import numpy as np


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure (rouge_score), mean over prediction/reference pairs.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list[str], references: list[str]",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        f = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": float(np.mean(f)) if f else float("nan")}
