"""`hf-gradfilter run ARGS` with the Hub faked: each push appends a JSON line to $FAKE_HUB_LOG instead.

    torchrun --nproc_per_node 2 run_fake_hub.py --config run.yaml --push_dataset_id me/rows
"""

import json
import os
import sys

from hf_gradfilter import hub
from hf_gradfilter.cli import main


def fake(kind):
    def push(repo_id, *args, **kwargs):
        with open(os.environ["FAKE_HUB_LOG"], "a") as f:
            f.write(json.dumps({"kind": kind, "repo": repo_id, "rank": os.environ.get("RANK", "0")}) + "\n")
        return f"https://huggingface.co/{repo_id}/commit/1"

    return push


hub.push_dataset_repo, hub.push_adapter_repo = fake("dataset"), fake("adapter")

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
