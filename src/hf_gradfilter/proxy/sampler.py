"""Each member's data order (`MemberSampler`), and the loader pieces that turn a step's rows into M
padded batches (`MemberRows`, `MemberCollator`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .record import file_array


class MemberSampler(Sampler[list]):
    """A batch sampler: each step, one batch of rows per member, each from that member's own order.

    Member m's order in epoch e comes from ``default_rng([seed, m, e])``: reproducible, and
    independent of how many members or processes there are. With ``lengths`` (length-grouped
    batching, the default), each member's permutation is cut into mega-batches of
    ``mega_batch_mult`` batches, each sorted by length and split into batches whose order is then
    shuffled, as in `transformers`' `LengthGroupedSampler`: rows of similar length share a batch,
    so little compute is padding. The one short batch (``n % global_batch``) is always last.

    Distributed: the *global* batches (``batch_size * num_replicas`` rows) are the ones a single
    process with that batch size would use, and process ``rank`` takes its slice of each, so every
    row is visited exactly once per member and epoch and the optimizer sees the same global batch
    as one process would. A process whose slice of the last batch is empty gets one row with
    weight 0 (no gradient, not recorded), so all processes take the same number of steps.

    Each step yields ``(row, epoch, weight, global_batch_size)`` tuples, members one after another.
    """

    def __init__(self, num_rows: int, num_members: int, batch_size: int, seed: int, lengths=None,
                 mega_batch_mult: int = 50, num_replicas: int = 1, rank: int = 0, directory: str | None = None):
        self.n, self.num_members, self.seed, self.directory = num_rows, num_members, seed, directory
        self.num_replicas, self.rank = num_replicas, rank
        self.batch_size = batch_size * num_replicas  # global
        self.lengths = None if lengths is None else np.asarray(lengths)
        if (self.lengths is not None and np.issubdtype(self.lengths.dtype, np.integer)
                and self.lengths.dtype.itemsize > 4 and self.lengths.max(initial=0) < 2**31):
            self.lengths = self.lengths.astype(np.int32)  # token counts: 4 bytes a row is plenty
        self.mega = max(1, min(mega_batch_mult, num_rows // (4 * self.batch_size)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, member: int, epoch: int) -> np.ndarray:
        """Member ``member``'s rows in epoch ``epoch`` (0-based) in visiting order: global batch k is
        ``order[k * batch_size : (k + 1) * batch_size]``.

        One int32 array of N (int64 from 2^31 rows), rearranged in place: 4 bytes per row and member,
        in an unnamed file in ``directory`` when the sampler has one (`record.file_array`).
        """
        rng = np.random.default_rng([self.seed, member, epoch])
        dtype = np.int32 if self.n < 2**31 else np.int64
        order = file_array((self.n,), dtype, 0, self.directory)
        for start in range(0, self.n, 1 << 20):  # 0, 1, ..., n-1 without a whole temporary
            order[start : start + (1 << 20)] = np.arange(start, min(start + (1 << 20), self.n), dtype=dtype)
        rng.shuffle(order.view(np.ndarray))  # = rng.permutation(n) without an int64 copy (a memmap subclass
        # would take numpy's slow per-element path: 250x slower at 1M rows; the view writes the same file)
        b = self.batch_size
        full = self.n - self.n % b
        if self.lengths is not None:
            for start in range(0, full, b * self.mega):  # each mega-batch sorted by length, longest first
                chunk = order[start : min(start + b * self.mega, full)]
                chunk[:] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            perm = rng.permutation(full // b)  # then the order of its full batches is shuffled
            order[:full] = order[:full].reshape(-1, b)[perm].reshape(-1)
        return order

    def batches(self, member: int, epoch: int) -> list[np.ndarray]:
        """Member ``member``'s global batches (row positions) in epoch ``epoch`` (0-based), in order:
        views into `order`."""
        order, b = self.order(member, epoch), self.batch_size
        return [order[i : i + b] for i in range(0, self.n, b)]

    def __iter__(self):
        orders, b = [self.order(m, self.epoch) for m in range(self.num_members)], self.batch_size
        for start in range(0, self.n, b):
            items = []
            for order in orders:
                batch = order[start : start + b]
                mine = np.array_split(batch, self.num_replicas)[self.rank]
                if len(mine):
                    items += [(int(i), self.epoch, 1.0, len(batch)) for i in mine]
                else:  # keep step counts equal across processes: a zero-weight stand-in
                    items.append((int(batch[0]), self.epoch, 0.0, len(batch)))
            yield items

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def padding_ratio(self, epoch: int = 0) -> float:
        """Tokens computed / real tokens over one epoch of every member (needs ``lengths``)."""
        computed = sum(len(bt) * self.lengths[bt].max() for m in range(self.num_members)
                       for bt in self.batches(m, epoch))
        return float(computed / (self.num_members * self.lengths.sum()))


class MemberRows(Dataset):
    """Rows of a tokenized dataset fetched by ``(row, epoch, weight, global_batch_size)`` keys."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["example_id", "input_ids", "labels"])

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        rows = self.dataset[[k[0] for k in keys]]
        return [{"example_id": rows["example_id"][j], "input_ids": rows["input_ids"][j], "labels": rows["labels"][j],
                 "epoch": k[1], "weight": k[2], "global_batch": k[3]} for j, k in enumerate(keys)]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


class EpochLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches its `MemberSampler` (the Trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def pad_rows(chunk: dict[str, list], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`pad_batch` of a column chunk of tokenized rows (``dataset[positions]``: ``input_ids``, ``labels``,
    ``example_id``)."""
    return pad_batch([{"input_ids": i, "labels": lab, "example_id": e}
                      for i, lab, e in zip(chunk["input_ids"], chunk["labels"], chunk["example_id"])], pad_token_id)


def pad_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` of a list of rows into tensors with an attention mask."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "example_id": torch.tensor([f["example_id"] for f in features], dtype=torch.long),
        "weight": torch.tensor([f.get("weight", 1.0) for f in features], dtype=torch.float32),
    }


class MemberCollator:
    """Splits a step's rows (members one after another, equally many each) into M padded batches."""

    def __init__(self, num_members: int, pad_token_id: int):
        self.num_members, self.pad_token_id = num_members, pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        b = len(features) // self.num_members
        return {
            "members": [pad_batch(features[m * b : (m + 1) * b], self.pad_token_id) for m in range(self.num_members)],
            "epoch": features[0]["epoch"],
            "global_batch": features[0]["global_batch"],
        }
