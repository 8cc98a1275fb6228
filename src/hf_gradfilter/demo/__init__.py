"""The embedded default, offline: a synthetic 12-task dataset with corrupted rows (`data`), tiny
GPT-2 / Llama models and a locally trained tokenizer (`tiny`), and the pre-trained backbone of the demo
proxy (`backbone`)."""

from .backbone import DEMO_LEARNING_RATE, cache_root, demo_proxy, demo_proxy_dir, pretrain_demo_proxy, pretrain_proxy

__all__ = ["DEMO_LEARNING_RATE", "cache_root", "demo_proxy", "demo_proxy_dir", "pretrain_demo_proxy", "pretrain_proxy"]
